"""Power cuts during a push, on a disk that keeps any part of what was written since its last
sync (`power_cut.PowerCutDisk`): the target's store is driven through `Database` exactly as
the session endpoints drive it (key and record batches unsynced, the bitmap read durable, the
commit synced) with the checkpoint thread running, then the power is cut and what the disk
holds is opened as a restarted daemon would.

The cuts come before a commit, after it, and in the middle of the checkpoint that copies the
log into the database. What must hold after every cut: the database passes SQLite's integrity
and foreign key checks; every record in it decompresses to bytes that hash to its key; an
answered commit's image reads back exactly; a block the bitmap answered as transferred still
has its record; nothing of an unanswered commit is visible; and the push, run again,
completes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import trio

from datapath_helpers import KIB, key_entries, keys_checksum, make_image, mutate, split
from power_cut import PowerCutDisk
from replicore import protocol
from replicore.store import checkpointer, db, images, migrations, sessions
from replicore.store.db import Database
from test_datapath_store import add_agent, request, verified

BS = 4 * KIB
BLOCKS = 160
#: (seed, share of the unsynced writes the disk kept): none, all (a crash of the process
#: alone), and random subsets.
CUTS = [(0, 0.0), (1, 1.0), (2, 0.5), (3, 0.5), (4, 0.2), (5, 0.8)]


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[PowerCutDisk]:
    vfs = PowerCutDisk()
    monkeypatch.setattr(db, "sync_file", vfs.tracking(checkpointer.sync_file))
    monkeypatch.setattr(checkpointer, "sync_file", vfs.tracking(checkpointer.sync_file))
    monkeypatch.setattr(checkpointer, "IDLE_SECONDS", 0.05)
    try:
        yield vfs
    finally:
        vfs.unregister()


class Target:
    """The store calls of the session endpoints, each in the mode its handler uses."""

    def __init__(self, path: Path) -> None:
        self.db = Database(path, readers=1)

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    async def open(self, agent: dict[str, Any], epoch: int, previous: int | None) -> int:
        wanted = request(epoch, BLOCKS * BS, previous)
        answer = await self.db.write(sessions.open_session, agent, wanted, time.time())
        found = await self.db.read(
            db.row, "SELECT id FROM sessions WHERE session_id = ?", (answer["sessionId"],)
        )
        assert found is not None
        return int(found["id"])

    async def keys(self, session_pk: int, entries: list[protocol.KeyEntry]) -> list[int]:
        return await self.db.write_unsynced(sessions.record_keys, session_pk, entries, time.time())

    async def records(self, session_pk: int, blocks: list[bytes], indices: list[int]) -> None:
        for start in range(0, len(indices), 16):
            batch = verified(blocks, indices[start : start + 16])
            stored, already, error = await self.db.write_unsynced(
                sessions.store_records, session_pk, batch, time.time()
            )
            assert error is None and stored + already == len(batch)

    async def bitmap(self, session_pk: int) -> bytes:
        session = await self.db.read(sessions.get, session_pk)
        return await self.db.read_durable(sessions.transferred_bitmap, session)

    async def commit(self, session_pk: int, entries: list[protocol.KeyEntry]) -> None:
        answer = await self.db.write(
            sessions.commit, session_pk, len(entries), keys_checksum(entries), time.time()
        )
        assert answer["committed"]

    async def push(self, agent: dict[str, Any], image: bytes, epoch: int) -> None:
        blocks = split(image, BS)
        entries = key_entries(blocks)
        session_pk = await self.open(agent, epoch, epoch - 1 if epoch > 1 else None)
        await self.records(session_pk, blocks, await self.keys(session_pk, entries))
        await self.commit(session_pk, entries)


async def checkpointed(path: Path) -> None:
    """Wait until the checkpoint thread has copied the log into the database and emptied it."""
    log = path.with_name(path.name + "-wal")
    with trio.fail_after(10):
        while log.exists() and log.stat().st_size > 0:
            await trio.sleep(0.02)


def new_database(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """The daemon's database under `tmp_path/live`, with one agent: its path and the agent."""
    path = tmp_path / "live" / "replicore.db"
    path.parent.mkdir()
    conn = db.connect(path, create=True)
    try:
        migrations.apply(conn, path)
        return path, add_agent(conn)
    finally:
        conn.close()


def check_restarted(path: Path) -> Any:
    """Open the database a restarted daemon finds; the checks every cut must pass."""
    conn = db.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    for key, codec, data, raw_length in conn.execute(
        "SELECT key, codec, data, raw_length FROM records"
    ):
        raw = protocol.decompress_record(codec, data, raw_length)
        assert protocol.record_key(raw) == key
    return conn


def exported(conn: Any, agent: dict[str, Any], epoch: int) -> bytes | None:
    image = images.find(conn, agent["id"], "vol", epoch)
    return None if image is None else b"".join(images.read_image(conn, image["id"]))


def present(conn: Any, key: bytes) -> bool:
    return conn.execute("SELECT 1 FROM records WHERE key = ?", (key,)).fetchone() is not None


async def resume_and_check(restarted: Path, agent: dict[str, Any], image: bytes, epoch: int):
    """The same push again on the restarted database completes and reads back exactly."""
    with Target(restarted) as target:
        await target.push(agent, image, epoch)
    with closing(check_restarted(restarted)) as conn:
        assert exported(conn, agent, epoch) == image


@pytest.mark.parametrize(("seed", "keep"), CUTS)
async def test_cut_before_the_commit_loses_no_answered_data_and_the_push_resumes(
    tmp_path: Path, disk: PowerCutDisk, seed: int, keep: float
):
    path, agent = new_database(tmp_path)
    epoch1 = make_image(seed, BLOCKS * BS, BS)
    epoch2 = mutate(epoch1, BS, range(seed, BLOCKS, 7), seed)
    blocks = split(epoch2, BS)
    entries = key_entries(blocks)
    with Target(path) as target:
        await target.push(agent, epoch1, 1)
        await checkpointed(path)
        session_pk = await target.open(agent, 2, 1)
        missing = await target.keys(session_pk, entries)
        half = len(missing) // 2
        await target.records(session_pk, blocks, missing[:half])
        bitmap = await target.bitmap(session_pk)
        await target.records(session_pk, blocks, missing[half:])
        assert disk.unsynced_operations() > 0  # the cut has something to lose
        disk.cut(random.Random(seed), tmp_path / "restarted", keep)

    restarted = tmp_path / "restarted" / "replicore.db"
    with closing(check_restarted(restarted)) as conn:
        assert exported(conn, agent, 1) == epoch1  # answered before the cut
        assert exported(conn, agent, 2) is None  # its commit was never asked
        marked = [i for i in range(BLOCKS) if bitmap[i // 8] >> (i % 8) & 1]
        assert set(missing[:half]) <= set(marked)
        assert all(present(conn, entries[i].key) for i in marked)
    await resume_and_check(restarted, agent, epoch2, 2)


@pytest.mark.parametrize(("seed", "keep"), CUTS)
async def test_cut_after_an_answered_commit_keeps_the_image(
    tmp_path: Path, disk: PowerCutDisk, seed: int, keep: float
):
    path, agent = new_database(tmp_path)
    epoch1 = make_image(seed + 10, BLOCKS * BS, BS)
    epoch2 = mutate(epoch1, BS, range(seed, BLOCKS, 5), seed)
    with Target(path) as target:
        await target.push(agent, epoch1, 1)
        await target.push(agent, epoch2, 2)
        # Records of a third epoch go on after the answer; the cut may take some of them.
        blocks = split(mutate(epoch2, BS, range(0, BLOCKS, 3), seed), BS)
        session_pk = await target.open(agent, 3, 2)
        missing = await target.keys(session_pk, key_entries(blocks))
        await target.records(session_pk, blocks, missing)
        disk.cut(random.Random(seed), tmp_path / "restarted", keep)

    with closing(check_restarted(tmp_path / "restarted" / "replicore.db")) as conn:
        assert exported(conn, agent, 1) == epoch1
        assert exported(conn, agent, 2) == epoch2
        assert exported(conn, agent, 3) is None


def test_the_disk_loses_exactly_what_was_not_synced(tmp_path: Path, disk: PowerCutDisk):
    """The rig itself: a synced transaction survives a cut that keeps nothing, an unsynced
    one survives only a cut that keeps everything."""
    path = tmp_path / "live" / "x.db"
    path.parent.mkdir()
    conn = db.connect(path, create=True)
    try:
        conn.execute("CREATE TABLE t (v INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")  # synchronous=FULL: synced
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("INSERT INTO t VALUES (2)")  # in the log, not synced
        disk.cut(random.Random(0), tmp_path / "none", keep=0.0)
        disk.cut(random.Random(0), tmp_path / "all", keep=1.0)
    finally:
        conn.close()
    for name, expected in (("none", [(1,)]), ("all", [(1,), (2,)])):
        with closing(db.connect(tmp_path / name / "x.db")) as restarted:
            assert restarted.execute("SELECT v FROM t ORDER BY v").fetchall() == expected


@pytest.mark.parametrize(("seed", "keep"), CUTS)
async def test_cut_while_the_checkpoint_copies_the_log_keeps_answered_images(
    tmp_path: Path, disk: PowerCutDisk, seed: int, keep: float
):
    path, agent = new_database(tmp_path)
    epoch1 = make_image(seed + 20, BLOCKS * BS, BS)
    # The database file is written only by checkpoints: the cut comes in the middle of the
    # first one after the push (the checkpoint thread's, once the writer is idle).
    disk.cut_at_write("replicore.db", 1 + seed * 3, random.Random(seed), tmp_path / "cut", keep)
    with Target(path) as target:
        await target.push(agent, epoch1, 1)
        answered_before_cut = not disk.cut_taken.is_set()
        await checkpointed(path)
    assert disk.cut_taken.is_set(), "the checkpoint wrote fewer pages than the cut waited for"

    with closing(check_restarted(tmp_path / "cut" / "replicore.db")) as conn:
        image = exported(conn, agent, 1)
        assert image == epoch1 if answered_before_cut else image in (None, epoch1)
