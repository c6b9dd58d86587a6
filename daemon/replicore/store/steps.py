"""Long store jobs written once, as a generator of steps (`Plan`), and run by either of two
drivers: `run` on a command's own connection, `run_in` through the daemon's `Database`.

A plan yields a `Step` and is sent back its result; its return value is the job's. Kinds:
`read` (fn(conn, *args) in one snapshot), `write` (in one write transaction), `scratch` (a
write to temp tables only: a command rolls it back and takes no write lock), `cpu` (fn(*args)
without the database, off the event loop in the daemon) and `checkpoint` (copy the log into
the database and cut it to nothing). Garbage collection (`gc.steps`) and verification
(`verify.plan`) are plans.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import apsw

from .db import Database, transaction

T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    kind: str
    fn: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()


Plan = Generator[Step, Any, T]
CHECKPOINT = Step("checkpoint")


def read(fn: Callable[..., Any], *args: Any) -> Step:
    return Step("read", fn, args)


def write(fn: Callable[..., Any], *args: Any) -> Step:
    return Step("write", fn, args)


def scratch(fn: Callable[..., Any], *args: Any) -> Step:
    return Step("scratch", fn, args)


def cpu(fn: Callable[..., Any], *args: Any) -> Step:
    return Step("cpu", fn, args)


def checkpoint(conn: apsw.Connection) -> tuple[int, int, int]:
    """`wal_checkpoint(TRUNCATE)` (outside any transaction): (busy, WAL frames, checkpointed);
    busy=1 when a reader or writer kept it from finishing (it is then only partial)."""
    busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return int(busy), int(frames), int(done)


def run(conn: apsw.Connection, plan: Plan[T]) -> T:
    """Run a plan on a command's own connection (writes in `BEGIN IMMEDIATE` transactions;
    SQLite's busy timeout waits for a running daemon)."""
    result: Any = None
    while True:
        try:
            step = plan.send(result)
        except StopIteration as stop:
            done: T = stop.value
            return done
        fn, args = step.fn, step.args
        if step.kind == "checkpoint":
            result = checkpoint(conn)
            continue
        assert fn is not None
        if step.kind == "read":
            with conn:  # a savepoint: one snapshot for the step
                result = fn(conn, *args)
        elif step.kind == "write":
            with transaction(conn):
                result = fn(conn, *args)
        elif step.kind == "scratch":
            conn.execute("BEGIN")
            try:
                result = fn(conn, *args)
            finally:
                conn.execute("ROLLBACK")
        else:
            result = fn(*args)


async def run_in(db: Database, plan: Plan[T]) -> T:
    """Run a plan through the daemon's database runner (a scratch step is a write there)."""
    import trio

    result: Any = None
    while True:
        try:
            step = plan.send(result)
        except StopIteration as stop:
            done: T = stop.value
            return done
        fn, args = step.fn, step.args
        if step.kind == "checkpoint":
            result = await db.checkpoint()
            continue
        assert fn is not None
        if step.kind == "read":
            result = await db.read(fn, *args)
        elif step.kind in ("write", "scratch"):
            result = await db.write(fn, *args)
        else:
            result = await trio.to_thread.run_sync(fn, *args)
