"""Connections to the one SQLite file, and the one-writer/many-readers runner for the daemon.

`connect()` applies the pragmas every connection needs. `Database` runs store functions off
the trio thread: writes one at a time, each in its own `BEGIN IMMEDIATE` transaction (so no
caller ever needs busy-retry code), reads on a small pool of connections. The CLI opens its
own connection with `open_existing()` and uses `transaction()`; SQLite's busy timeout
serialises it with a running daemon.

A full disk (or the daemon's size cap, `server.max_database_bytes`, applied as SQLite's
per-connection `max_page_count` on the writer) makes a write fail with SQLITE_FULL: the
transaction is rolled back whole and `Database.write` raises `InsufficientStorage` (507).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import apsw

from ..errors import InsufficientStorage
from .checkpointer import TRUNCATE_WAIT_MS, Checkpointer, sync_file

P = ParamSpec("P")
T = TypeVar("T")

BUSY_TIMEOUT_MS = 15_000
PAGE_SIZE = 16384
#: Values per `IN (...)` list: well under SQLite's variable limit, big enough to be fast.
IN_CHUNK = 1000
#: SQLite's largest INTEGER (a signed 64-bit value): a larger number cannot be stored.
MAX_STORED_INT = 2**63 - 1
#: SQLite's own largest max_page_count: no cap.
UNLIMITED_PAGES = 4294967294
#: A statement journal (the undo log of one statement inside a transaction) stays in memory
#: up to this size. Every insert into `records` keeps one (its foreign key and usage trigger
#: may abort it), about ten pages; with SQLite's default of 64 KiB each went to a temp file,
#: as many system calls as storing the records themselves.
STATEMENT_JOURNAL_IN_MEMORY = 16 * 1024 * 1024
#: The writer connection's page cache. A transaction whose dirty pages overflow the cache
#: spills them into the log early; a page spilled and then changed again (the records
#: table's last leaf, an index leaf, the repository's usage row) is rewritten in place, and
#: the commit then reads back every frame after it to redo the log's checksums. With
#: SQLite's default 2 MiB, each 8 MiB record batch did that: a 1 GiB first push read 375 MiB
#: of frames back and wrote 190 MiB more of them. This holds a batch with room to spare.
WRITER_CACHE_BYTES = 32 * 1024 * 1024


def _configure_sqlite() -> None:
    """Process-wide SQLite settings; they can only change while no connection is open."""
    if apsw.connections():
        return
    apsw.shutdown()
    apsw.config(apsw.SQLITE_CONFIG_STMTJRNL_SPILL, STATEMENT_JOURNAL_IN_MEMORY)
    apsw.initialize()


_configure_sqlite()


class NoDatabase(RuntimeError):
    """The command needs a database that `replicore serve` has not created yet."""


def connect(path: Path, *, create: bool = False, max_bytes: int = 0) -> apsw.Connection:
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
    limit_size(conn, max_bytes)
    return conn


def limit_size(conn: apsw.Connection, max_bytes: int) -> None:
    """Cap the database file this connection may grow (0: no cap). A write past it fails
    with SQLITE_FULL, as on a full disk; pages freed inside the file are reused first."""
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    pages = max(1, max_bytes // page_size) if max_bytes > 0 else UNLIMITED_PAGES
    conn.execute(f"PRAGMA max_page_count={pages}")


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
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (SQLITE_FULL, IOERR); a failed COMMIT has not.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def rows(conn: apsw.Connection, sql: str, bindings: Any = ()) -> list[dict[str, Any]]:
    """Run a query and return its rows as dicts keyed by column name."""
    cursor = conn.execute(sql, bindings)
    try:
        names = [d[0] for d in cursor.get_description()]
    except apsw.ExecutionCompleteError:
        return []
    return [dict(zip(names, row, strict=True)) for row in cursor]


def rows_in(
    conn: apsw.Connection,
    sql: str,
    leading: tuple[Any, ...],
    values: Sequence[Any],
    chunk: int = IN_CHUNK,
) -> Iterator[tuple[Any, ...]]:
    """Run `sql`, whose `{marks}` stands for an `IN (...)` list, over `values` a chunk at a
    time (bound after `leading`); yield the rows of every chunk."""
    for start in range(0, len(values), chunk):
        part = values[start : start + chunk]
        yield from conn.execute(sql.format(marks=",".join("?" * len(part))), (*leading, *part))


def row(conn: apsw.Connection, sql: str, bindings: Any = ()) -> dict[str, Any] | None:
    found = rows(conn, sql, bindings)
    return found[0] if found else None


class Database:
    """One writer connection (serialised by a lock) and a pool of reader connections."""

    def __init__(self, path: Path, readers: int = 4, max_bytes: int = 0) -> None:
        import trio

        self.path = path
        self._writer = connect(path, max_bytes=max_bytes)
        self._writer.execute(f"PRAGMA cache_size={-WRITER_CACHE_BYTES // 1024}")
        self._write_lock = trio.Lock()
        # Held by the writer's thread around each transaction, and by the checkpoint thread
        # while it restarts the log (SQLite's busy waits would rarely catch the gap between
        # two transactions of a busy writer).
        self._transaction_lock = threading.Lock()
        self._checkpointer = Checkpointer(
            path, self._writer, connect(path), BUSY_TIMEOUT_MS, self._transaction_lock
        )
        self._readers = [connect(path) for _ in range(readers)]
        self._reader_limit = trio.CapacityLimiter(readers)
        self._thread_lock = threading.Lock()

    async def write(
        self, fn: Callable[Concatenate[apsw.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run fn(conn, ...) in one write transaction, synced to disk before it returns; it
        completes even if the caller is cancelled, so a transaction is never cut in the
        middle. A full disk or database (SQLITE_FULL) rolls it back and raises
        InsufficientStorage."""
        return await self._write("FULL", fn, *args, **kwargs)

    async def write_unsynced(
        self, fn: Callable[Concatenate[apsw.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """As `write`, but without waiting for the disk (synchronous=NORMAL): the transaction
        survives a crash of the process, and a power loss once any later `write` has synced
        the log (WAL) that holds it. For record batches, which a volume image's commit
        (a `write`) makes durable together with itself."""
        return await self._write("NORMAL", fn, *args, **kwargs)

    async def _write(
        self,
        synchronous: str,
        fn: Callable[Concatenate[apsw.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        import trio

        def run() -> T:
            with self._transaction_lock:
                self._writer.execute(f"PRAGMA synchronous={synchronous}")
                with transaction(self._writer):
                    return fn(self._writer, *args, **kwargs)

        async with self._write_lock:
            try:
                return await trio.to_thread.run_sync(run)
            except apsw.FullError:
                raise InsufficientStorage(
                    "the database is full: its disk or its configured size"
                    " (server.max_database_bytes) has no room left"
                ) from None

    async def checkpoint(self) -> bool:
        """Copy the log into the database and cut it to nothing, between two transactions of
        the writer (garbage collection, after giving pages back, so the file shrinks). False
        when a reader or the checkpoint thread kept it from finishing (tried again later)."""
        import trio

        def run() -> bool:
            with self._transaction_lock:
                self._writer.set_busy_timeout(TRUNCATE_WAIT_MS)
                try:
                    self._writer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
                except apsw.BusyError:
                    return False
                finally:
                    self._writer.set_busy_timeout(BUSY_TIMEOUT_MS)
            return True

        async with self._write_lock:
            return await trio.to_thread.run_sync(run)

    async def limit_size(self, max_bytes: int) -> None:
        """Cap the size of the database the writer may grow (0: no cap); see `limit_size`."""
        import trio

        async with self._write_lock:
            await trio.to_thread.run_sync(limit_size, self._writer, max_bytes)

    async def read(
        self, fn: Callable[Concatenate[apsw.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run fn(conn, ...) on a reader connection, in one read transaction."""
        import trio

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

    async def read_durable(
        self, fn: Callable[Concatenate[apsw.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """As `read`, then the log is synced: what fn saw is on disk when this returns, also
        the transactions written without their own sync (`write_unsynced`)."""
        import trio

        result = await self.read(fn, *args, **kwargs)
        await trio.to_thread.run_sync(sync_file, f"{self.path}-wal")
        return result

    def close(self) -> None:
        self._checkpointer.close()
        for conn in [self._writer, *self._readers]:
            conn.close()
