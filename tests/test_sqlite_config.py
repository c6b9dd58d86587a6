"""SQLite settings of `store.db`: storing records keeps its statement journals in memory (a
temp file per batch doubled the system calls of the write path), and the writer's page cache
holds a whole record batch (a smaller one spilled, then read frames back from the log)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import apsw
import pytest

from datapath_helpers import KIB, key_entries, make_image
from test_datapath_store import add_agent, push, verified


class OpenedFiles(apsw.VFS):
    """The default VFS, noting the kind of every file SQLite opens through it."""

    def __init__(self) -> None:
        self.flags: list[int] = []
        super().__init__("opened-files", "", makedefault=True)

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        self.flags.append(flags[0])
        return super().xOpen(name, flags)


@pytest.fixture
def opened() -> Iterator[OpenedFiles]:
    vfs = OpenedFiles()
    try:
        yield vfs
    finally:
        vfs.unregister()


def test_storing_records_opens_no_statement_journal_file(tmp_path: Any, opened: OpenedFiles):
    from replicore.store import db, migrations

    path = tmp_path / "replicore.db"
    conn = db.connect(path, create=True)
    try:
        migrations.apply(conn, path)
        image = make_image(7, 256 * 4 * KIB + 100, 4 * KIB)
        push(conn, add_agent(conn), image, 1)
        assert any(f & apsw.SQLITE_OPEN_MAIN_DB for f in opened.flags), "the VFS saw nothing"
    finally:
        conn.close()
    subjournals = [f for f in opened.flags if f & apsw.SQLITE_OPEN_SUBJOURNAL]
    assert subjournals == []


def _store_counting_spills(conn: apsw.Connection, *args: Any) -> tuple[Any, int]:
    """`sessions.store_records`, and how many pages its transaction spilled from the cache
    into the log before its commit."""
    from replicore.store import sessions

    conn.status(apsw.SQLITE_DBSTATUS_CACHE_SPILL, True)
    stored = sessions.store_records(conn, *args)
    return stored, conn.status(apsw.SQLITE_DBSTATUS_CACHE_SPILL)[0]


async def test_the_writer_holds_a_record_batch_in_its_cache(tmp_path: Any):
    """A spilled page changed again later in its transaction is rewritten in the log, and
    the commit reads back every frame after it (375 MiB for a 1 GiB push)."""
    from replicore.api.sessions import SLICE_BYTES
    from replicore.store import db, migrations, sessions

    path = tmp_path / "replicore.db"
    conn = db.connect(path, create=True)
    try:
        migrations.apply(conn, path)
        agent = add_agent(conn)
    finally:
        conn.close()
    block_size = 64 * KIB
    rng = random.Random(5)
    # Hex text, stored at about half its size (as much of a disk image is): a batch of
    # SLICE_BYTES of records.
    blocks = [
        rng.randbytes(block_size // 2).hex().encode() for _ in range(2 * SLICE_BYTES // block_size)
    ]
    request = sessions.SessionRequest(
        job_id="job",
        driver_volume_id="vol",
        epoch_number=1,
        previous_epoch_number=None,
        block_size=block_size,
        size=len(blocks) * block_size,
        recovery_point_id="rp1",
        recovery_point_timestamp="2026-11-27T10:00:00Z",
        volume_count=1,
    )
    database = db.Database(path, readers=1)
    try:
        now = time.time()
        opened = await database.write(sessions.open_session, agent, request, now)
        found = await database.read(
            db.row, "SELECT id FROM sessions WHERE session_id = ?", (opened["sessionId"],)
        )
        assert found is not None
        missing = await database.write(sessions.record_keys, found["id"], key_entries(blocks), now)
        batch = verified(blocks, missing)
        assert sum(len(record.data) for record in batch) >= SLICE_BYTES
        (stored, _, error), spilled = await database.write_unsynced(
            _store_counting_spills, found["id"], batch, now
        )
    finally:
        database.close()
    assert error is None and stored == len(blocks)
    assert spilled == 0
