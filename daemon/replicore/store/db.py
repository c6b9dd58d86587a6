"""Connections to the one SQLite file, and the one-writer/many-readers runner for the daemon.

`connect()` applies the pragmas every connection needs. `Database` runs store functions off
the trio thread: writes one at a time, each in its own `BEGIN IMMEDIATE` transaction (so no
caller ever needs busy-retry code), reads on a small pool of connections. The CLI opens its
own connection with `open_existing()` and uses `transaction()`; SQLite's busy timeout
serialises it with a running daemon.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import apsw
import trio

P = ParamSpec("P")
T = TypeVar("T")

BUSY_TIMEOUT_MS = 15_000
PAGE_SIZE = 16384


class NoDatabase(RuntimeError):
    """The command needs a database that `replicore serve` has not created yet."""


def connect(path: Path, *, create: bool = False) -> apsw.Connection:
    flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_CREATE if create else 0)
    conn = apsw.Connection(str(path), flags=flags)
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    if create and conn.execute("PRAGMA page_count").fetchone()[0] == 0:
        # Only effective before the first table exists; needed for the file to ever shrink.
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA trusted_schema=OFF")
    return conn


def open_existing(path: Path) -> apsw.Connection:
    """Open the daemon's database for a command; NoDatabase names where it looked."""
    if not path.exists():
        raise NoDatabase(
            f"no database at {path.resolve()}; run `replicore serve` with the same config first"
        )
    from . import migrations

    conn = connect(path)
    migrations.check_current(conn, path)
    return conn


@contextlib.contextmanager
def transaction(conn: apsw.Connection) -> Iterator[apsw.Connection]:
    """An immediate write transaction: commit on success, roll back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def rows(conn: apsw.Connection, sql: str, bindings: Any = ()) -> list[dict[str, Any]]:
    """Run a query and return its rows as dicts keyed by column name."""
    cursor = conn.execute(sql, bindings)
    try:
        names = [d[0] for d in cursor.get_description()]
    except apsw.ExecutionCompleteError:
        return []
    return [dict(zip(names, row, strict=True)) for row in cursor]


def row(conn: apsw.Connection, sql: str, bindings: Any = ()) -> dict[str, Any] | None:
    found = rows(conn, sql, bindings)
    return found[0] if found else None


class Database:
    """One writer connection (serialised by a lock) and a pool of reader connections."""

    def __init__(self, path: Path, readers: int = 4) -> None:
        self.path = path
        self._writer = connect(path)
        self._write_lock = trio.Lock()
        self._readers = [connect(path) for _ in range(readers)]
        self._reader_limit = trio.CapacityLimiter(readers)
        self._thread_lock = threading.Lock()

    async def write(
        self, fn: Callable[Concatenate[apsw.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run fn(conn, ...) in one write transaction; it completes even if the caller is
        cancelled, so a transaction is never cut in the middle."""

        def run() -> T:
            with transaction(self._writer):
                return fn(self._writer, *args, **kwargs)

        async with self._write_lock:
            return await trio.to_thread.run_sync(run)

    async def read(
        self, fn: Callable[Concatenate[apsw.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run fn(conn, ...) on a reader connection, in one read transaction."""
        async with self._reader_limit:
            with self._thread_lock:
                conn = self._readers.pop()
            try:

                def run() -> T:
                    with conn:  # a savepoint: one consistent snapshot for the whole fn
                        return fn(conn, *args, **kwargs)

                return await trio.to_thread.run_sync(run)
            finally:
                with self._thread_lock:
                    self._readers.append(conn)

    def close(self) -> None:
        for conn in [self._writer, *self._readers]:
            conn.close()
