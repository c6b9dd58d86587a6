"""The WAL checkpoint thread: the writer's commits only append to the log; the thread copies
the log into the database once the writer is idle, and again after a reader let it go."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest
import trio

from replicore.store import checkpointer
from replicore.store import db as db_module
from replicore.store.db import Database, connect

ROWS = 64  # of 60,000 bytes: about 4 MiB of log per write


def _fill(conn: apsw.Connection) -> None:
    for _ in range(ROWS):
        conn.execute("INSERT INTO t VALUES (randomblob(60000))")


def _database(tmp_path: Path) -> Path:
    path = tmp_path / "x.db"
    conn = connect(path, create=True)
    conn.execute("CREATE TABLE t (b BLOB)")
    conn.close()
    return path


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_commits_leave_the_copy_to_the_thread_until_the_writer_is_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpointer, "IDLE_SECONDS", 0.3)
    path = _database(tmp_path)
    db = Database(path)
    try:
        size_before = path.stat().st_size

        async def writes() -> None:
            for _ in range(3):
                await db.write_unsynced(_fill)

        trio.run(writes)
        # Nothing was copied by the commits themselves (the default would every 1000 pages).
        assert path.stat().st_size == size_before
        assert _wait_for(lambda: path.stat().st_size > 3 * ROWS * 60000)
        count = connect(path).execute("SELECT count(*) FROM t").fetchone()[0]
        assert count == 3 * ROWS
    finally:
        db.close()


def test_a_reader_holding_old_pages_delays_the_checkpoint_which_completes_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpointer, "IDLE_SECONDS", 0.2)
    path = _database(tmp_path)
    db = Database(path)
    reader = connect(path)
    try:

        async def write() -> None:
            await db.write_unsynced(_fill)

        trio.run(write)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchone()  # holds a snapshot
        trio.run(write)
        time.sleep(1.0)  # the thread tried: the pages after the reader's snapshot stay
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == ROWS
        reader.execute("COMMIT")
        assert _wait_for(lambda: path.stat().st_size > 2 * ROWS * 60000)
    finally:
        reader.close()
        db.close()


def test_once_copied_while_the_writer_is_idle_the_log_is_emptied_and_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpointer, "IDLE_SECONDS", 0.2)
    path = _database(tmp_path)
    db = Database(path)
    wal = Path(f"{path}-wal")
    try:
        sizes = []
        for round_ in range(1, 4):

            async def write() -> None:
                await db.write_unsynced(_fill)

            trio.run(write)
            sizes.append(wal.stat().st_size)
            assert _wait_for(lambda: path.stat().st_size >= round_ * ROWS * 60000)  # noqa: B023
            assert _wait_for(lambda: wal.stat().st_size == 0)
        assert sizes[2] == sizes[0]  # each round writes a new log from its start
    finally:
        db.close()


def test_a_log_past_a_quarter_of_the_free_disk_is_copied_without_waiting_for_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpointer, "IDLE_SECONDS", 3600.0)  # the writer is never idle
    real = os.statvfs(tmp_path)

    class Small:  # 16 MiB free: copy the log once it holds 4 MiB
        f_frsize = real.f_frsize
        f_bavail = 16 * 1024 * 1024 // real.f_frsize

    monkeypatch.setattr(checkpointer.os, "statvfs", lambda _: Small)
    path = _database(tmp_path)
    db = Database(path)
    try:

        async def write() -> None:
            await db.write_unsynced(_fill)
            await db.write_unsynced(_fill)

        trio.run(write)
        assert _wait_for(lambda: path.stat().st_size > ROWS * 60000)
    finally:
        db.close()


def test_a_log_written_without_pause_still_starts_over_and_no_commit_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpointer, "IDLE_SECONDS", 3600.0)  # never idle
    monkeypatch.setattr(checkpointer, "BUSY_BYTES", 8 * 1024 * 1024)
    # The writer's own checkpoint past this size races the thread's (SQLITE_BUSY): the
    # commit must not see it.
    monkeypatch.setattr(checkpointer, "BACKSTOP_BYTES", 12 * 1024 * 1024)
    path = _database(tmp_path)
    db = Database(path)
    wal = Path(f"{path}-wal")
    try:
        largest = 0

        async def writes() -> None:
            nonlocal largest
            for _ in range(40):  # about 160 MiB, back to back
                await db.write_unsynced(_fill)
                largest = max(largest, wal.stat().st_size)

        trio.run(writes)
        assert largest < 64 * 1024 * 1024  # restarted, not 160 MiB
        count = connect(path).execute("SELECT count(*) FROM t").fetchone()[0]
        assert count == 40 * ROWS
    finally:
        db.close()


def test_an_asked_checkpoint_empties_the_log_between_two_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpointer, "IDLE_SECONDS", 3600)  # the thread stays out of it
    path = _database(tmp_path)
    wal = Path(f"{path}-wal")
    db = Database(path)
    try:

        async def write_then_checkpoint() -> bool:
            await db.write_unsynced(_fill)
            assert wal.stat().st_size > ROWS * 60000
            done = await db.checkpoint()
            await db.write_unsynced(_fill)  # the writer goes on in the restarted log
            return done

        assert trio.run(write_then_checkpoint)
        assert path.stat().st_size > ROWS * 60000
        assert wal.stat().st_size < 2 * ROWS * 60000
        assert connect(path).execute("SELECT count(*) FROM t").fetchone()[0] == 2 * ROWS
    finally:
        db.close()


def test_a_durable_read_syncs_the_log_after_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _database(tmp_path)
    events: list[str] = []
    monkeypatch.setattr(db_module, "sync_file", lambda p: events.append(f"sync {p}"))
    db = Database(path)
    try:

        def count(conn: apsw.Connection) -> int:
            events.append("read")
            return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])

        async def write_then_read() -> int:
            await db.write_unsynced(_fill)
            return await db.read_durable(count)

        assert trio.run(write_then_read) == ROWS
        assert events == ["read", f"sync {path}-wal"]
    finally:
        db.close()
