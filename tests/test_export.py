"""`replicore export`'s reading and writing, without a server: images stored through the data
path's store functions are read back by `store/image_reader.py` and written by
`cli/export.py` exactly, across chunk boundaries, epochs, block sizes, zero blocks (holes),
compressed and raw records, with and without direct I/O; damage is refused naming the block
and leaves no file behind. (The command against a real server: tests/test_datapath.py.)"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import apsw
import blake3
import pytest

from datapath_helpers import KIB, key_entries, keys_checksum, split
from replicore import protocol
from replicore.cli import export as export_command
from replicore.store import db, image_reader, images, repositories, sessions


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few blocks and a short read-ahead, so that small images cross many chunk
    boundaries and the buffers are recycled many times."""
    monkeypatch.setattr(image_reader, "CHUNK_BYTES", 3 * 4 * KIB)
    monkeypatch.setattr(image_reader, "AHEAD", 2)


def add_agent(conn: apsw.Connection, agent_id: str = "web01") -> dict[str, Any]:
    repository_id = repositories.create(conn, f"repo-{agent_id}", None)
    conn.execute(
        "INSERT INTO master_cores(core_id, fingerprint, certificate, state, method, requested_at)"
        " VALUES (?, ?, '', 'approved', 'demand', 0)",
        (f"core-{agent_id}", f"fp-{agent_id}"),
    )
    conn.execute(
        "INSERT INTO agents(core_pk, agent_id, state, repository_id, created_at)"
        " VALUES (?, ?, 'approved', ?, 0)",
        (conn.last_insert_rowid(), agent_id, repository_id),
    )
    agent = db.row(conn, "SELECT * FROM agents WHERE id = ?", (conn.last_insert_rowid(),))
    assert agent is not None
    return agent


def disk_image(seed: int, size: int, block_size: int) -> bytes:
    """Zero, log-like (compressible: stored as zstd), random (stored raw) and repeated
    blocks; the last one short when `size` is not a multiple of `block_size`."""
    rng = random.Random(seed)
    blocks: list[bytes] = []
    for index in range(-(-size // block_size)):
        kind = rng.choice(["zero", "text", "random", "repeat"])
        if kind == "zero":
            blocks.append(bytes(block_size))
        elif kind == "text":
            line = f"{index:08d} service[{rng.randrange(99)}]: ok {rng.random()}\n"
            blocks.append((line * (block_size // len(line) + 1)).encode()[:block_size])
        elif kind == "repeat" and blocks:
            blocks.append(rng.choice(blocks))
        else:
            blocks.append(rng.randbytes(block_size))
    return b"".join(blocks)[:size]


def push(
    conn: apsw.Connection,
    agent: dict[str, Any],
    image: bytes,
    epoch: int,
    block_size: int,
    previous: int | None = None,
) -> dict[str, Any]:
    """Store `image` as epoch `epoch` through the data path's store, as the API does."""
    blocks = split(image, block_size)
    now = time.time()
    request = sessions.SessionRequest(
        job_id="job",
        driver_volume_id="vol",
        epoch_number=epoch,
        previous_epoch_number=previous,
        block_size=block_size,
        size=len(image),
        recovery_point_id=f"rp{epoch}",
        recovery_point_timestamp="2026-11-27T10:00:00Z",
        volume_count=1,
    )
    with db.transaction(conn):
        opened = sessions.open_session(conn, agent, request, now)
    session = db.row(conn, "SELECT id FROM sessions WHERE session_id = ?", (opened["sessionId"],))
    assert session is not None
    entries = key_entries(blocks)
    with db.transaction(conn):
        missing = sessions.record_keys(conn, session["id"], entries, now)
    batch = []
    for index in missing:
        codec, payload = protocol.compress_block(blocks[index])
        key = protocol.record_key(blocks[index])
        batch.append(sessions.VerifiedRecord(index, key, len(blocks[index]), codec, payload))
    with db.transaction(conn):
        stored, _, error = sessions.store_records(conn, session["id"], batch, now)
    assert error is None and stored == len(missing)
    with db.transaction(conn):
        sessions.commit(conn, session["id"], len(blocks), keys_checksum(entries), now)
    row = images.find(conn, agent["id"], "vol", epoch)
    assert row is not None
    return row


def export(conn: apsw.Connection, image_id: int, output: Path) -> tuple[int, str, str | None]:
    conn.execute("BEGIN")
    try:
        return export_command.export(conn, image_id, output, sha256=True)
    finally:
        conn.execute("ROLLBACK")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def assert_exported(conn: apsw.Connection, image_id: int, output: Path, image: bytes) -> None:
    fds = open_fds()
    written, b3, sha = export(conn, image_id, output)
    assert open_fds() == fds
    assert output.read_bytes() == image
    assert written == len(image)
    assert b3 == blake3.blake3(image).hexdigest()
    assert sha == hashlib.sha256(image).hexdigest()
    assert not output.with_name(output.name + ".tmp").exists()


def stored_codecs(conn: apsw.Connection) -> set[int]:
    return {codec for (codec,) in conn.execute("SELECT DISTINCT codec FROM records")}


@pytest.mark.parametrize(
    ("block_size", "size"),
    [
        (4 * KIB, 50 * 4 * KIB),  # whole blocks
        (4 * KIB, 50 * 4 * KIB + 100),  # a short last block, not a whole page
        (64 * KIB, 7 * 64 * KIB + 8 * KIB),  # a short last block of whole pages
        (1024 * KIB, 2 * 1024 * KIB + 1),  # the largest blocks, a one-byte last block
    ],
)
def test_every_kind_of_block_exports_exactly_across_chunks(
    conn, tmp_path, small_chunks, block_size, size
):
    agent = add_agent(conn)
    image = disk_image(block_size + size, size, block_size)
    row = push(conn, agent, image, 1, block_size)
    assert stored_codecs(conn) == {protocol.CODEC_RAW, protocol.CODEC_ZSTD}
    assert_exported(conn, row["id"], tmp_path / "out.img", image)


def test_each_epoch_of_a_chain_exports_exactly(conn, tmp_path, small_chunks):
    bs = 4 * KIB
    agent = add_agent(conn)
    epochs = [disk_image(1, 40 * bs + 10, bs)]
    for seed in (2, 3):
        changed = bytearray(epochs[-1])
        for index in random.Random(seed).sample(range(40), 6):
            changed[index * bs : (index + 1) * bs] = disk_image(seed * 100 + index, bs, bs)
        epochs.append(bytes(changed))
    rows = [push(conn, agent, epochs[0], 1, bs)]
    rows.append(push(conn, agent, epochs[1], 2, bs, previous=1))
    rows.append(push(conn, agent, epochs[2], 3, bs, previous=2))
    assert rows[2]["stored_block_count"] < rows[2]["block_count"]
    for row, image in zip(rows, epochs, strict=True):
        assert_exported(conn, row["id"], tmp_path / f"epoch{row['epoch_number']}.img", image)


def test_zero_blocks_are_left_as_holes(conn, tmp_path):
    bs = 64 * KIB
    agent = add_agent(conn)
    image = bytes(40 * bs) + os.urandom(bs) + bytes(40 * bs)
    row = push(conn, agent, image, 1, bs)
    output = tmp_path / "sparse.img"
    assert_exported(conn, row["id"], output, image)
    with output.open("rb") as f:
        try:
            first_data = os.lseek(f.fileno(), 0, os.SEEK_DATA)
        except OSError as error:  # a file system without SEEK_DATA
            pytest.skip(f"no SEEK_DATA here: {error}")
        if first_data == 0 and output.stat().st_blocks * 512 >= len(image):
            pytest.skip("this file system does not keep holes")
        assert first_data == 40 * bs
        assert os.lseek(f.fileno(), first_data, os.SEEK_HOLE) == 41 * bs


def test_the_page_cache_is_used_where_direct_io_is_refused(
    conn, tmp_path, small_chunks, monkeypatch
):
    bs = 4 * KIB
    agent = add_agent(conn)
    image = disk_image(9, 30 * bs + 77, bs)
    row = push(conn, agent, image, 1, bs)
    real_open, real_pwrite = os.open, os.pwrite
    direct = getattr(os, "O_DIRECT", 0)

    def refuse_direct_open(path: Any, flags: int, *args: Any) -> int:
        if direct and flags & direct:
            raise OSError(errno.EINVAL, "no O_DIRECT here")
        return real_open(path, flags, *args)

    monkeypatch.setattr(export_command.os, "open", refuse_direct_open)
    assert_exported(conn, row["id"], tmp_path / "cached.img", image)
    monkeypatch.setattr(export_command.os, "open", real_open)

    # Direct I/O opened but refusing the writes' alignment: the writes go through the cache.
    direct_fds: set[int] = set()

    def track_open(path: Any, flags: int, *args: Any) -> int:
        fd = real_open(path, flags, *args)
        if direct and flags & direct:
            direct_fds.add(fd)
        return fd

    def refuse_direct_write(fd: int, data: Any, offset: int) -> int:
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "misaligned")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(export_command.os, "open", track_open)
    monkeypatch.setattr(export_command.os, "pwrite", refuse_direct_write)
    assert_exported(conn, row["id"], tmp_path / "fallback.img", image)


def damage(conn: apsw.Connection, block: bytes, data: bytes | None) -> None:
    """Overwrite the stored bytes of `block`'s record (None: delete the record)."""
    key = protocol.record_key(block)
    if data is None:
        conn.execute("DELETE FROM records WHERE key = ?", (key,))
    else:
        conn.execute("UPDATE records SET data = ? WHERE key = ?", (data, key))
    assert conn.changes() == 1


def first_block(image: bytes, bs: int, wanted: str) -> int:
    """Index of the first block that is all zero, raw (incompressible) or compressible."""
    for index, block in enumerate(split(image, bs)):
        codec, _ = protocol.compress_block(block)
        zero = block == bytes(len(block))
        kind = "zero" if zero else "raw" if codec == protocol.CODEC_RAW else "zstd"
        if kind == wanted:
            return index
    raise AssertionError(f"no {wanted} block")


@pytest.mark.parametrize(
    ("kind", "how", "message"),
    [
        ("raw", "flip", "does not match its key"),
        ("zstd", "garbage", "is damaged"),
        ("zstd", "delete", "is missing"),
        ("raw", "delete", "is missing"),
        ("zero", "delete", "is missing"),
    ],
)
def test_a_damaged_or_missing_record_fails_the_export_naming_its_block(
    conn, tmp_path, small_chunks, kind, how, message
):
    bs = 4 * KIB
    agent = add_agent(conn)
    image = disk_image(11, 60 * bs, bs)
    row = push(conn, agent, image, 1, bs)
    index = first_block(image, bs, kind)
    block = split(image, bs)[index]
    stored = conn.execute(
        "SELECT data FROM records WHERE key = ?", (protocol.record_key(block),)
    ).fetchone()[0]
    if how == "flip":
        damage(conn, block, bytes([stored[0] ^ 1]) + stored[1:])
    elif how == "garbage":
        damage(conn, block, os.urandom(len(stored)))
    else:
        damage(conn, block, None)
    output = tmp_path / "out.img"
    threads, fds = threading.active_count(), open_fds()
    with pytest.raises(images.DamagedImage) as refused:
        export(conn, row["id"], output)
    assert f"block {index} {message}" in str(refused.value)
    assert not output.exists() and not output.with_name("out.img.tmp").exists()
    assert threading.active_count() == threads and open_fds() == fds


def test_a_reader_closed_early_stops_its_threads_and_frees_the_connection(conn, small_chunks):
    bs = 4 * KIB
    agent = add_agent(conn)
    image = disk_image(13, 80 * bs, bs)
    row = push(conn, agent, image, 1, bs)
    threads = threading.active_count()
    conn.execute("BEGIN")
    chunks = image_reader.read_chunks(conn, row["id"])
    first = next(chunks)
    assert bytes(first.data) == image[: len(first.data)]
    chunks.close()
    assert threading.active_count() == threads
    conn.execute("ROLLBACK")  # the reading thread's blob is closed: the transaction can end


def test_chunks_are_the_image_in_order_with_runs_of_nonzero_blocks(conn, small_chunks):
    bs = 4 * KIB
    agent = add_agent(conn)
    image = disk_image(17, 33 * bs + 5, bs)
    row = push(conn, agent, image, 1, bs)
    conn.execute("BEGIN")
    try:
        pieces = []
        for chunk in image_reader.read_chunks(conn, row["id"]):
            start = chunk.start * bs
            data = bytes(chunk.data)
            assert data == image[start : start + len(data)]
            covered = bytearray(len(data))
            for begin, end in chunk.runs:
                covered[begin:end] = data[begin:end]
            assert covered == data  # outside the runs, only zero blocks
            pieces.append(data)
    finally:
        conn.execute("ROLLBACK")
    assert b"".join(pieces) == image
