"""Direct (O3E) replication sessions: a whole snapshot file sent as a used-block bitmap and
then the used blocks themselves, for sources that cannot hash (docs/protocol.md, "Direct
replication").

A direct session *is* a data-path session (`store/sessions.py`: same `sessions` row, key
announcements, quota reservations, records, commit), plus one `direct_sessions` row that goes
away with it (foreign key, ON DELETE CASCADE) holding what the direct transfer adds: the
snapshot file (SCID and file info), the used-block bitmap, and how far the used blocks have
arrived (`next_block`: the next used block expected; blocks arrive in ascending order).

The target does what a hashing source would: when the bitmap is set, every block not in it is
announced with the key of a zero block of its length (and that zero record stored once); each
used block that arrives is hashed (BLAKE3), announced and stored once per repository
(`sessions.record_keys` / `sessions.store_records`). When the last used block is in, the
session is committed by `sessions.commit` in the same transaction, exactly like a pushed
image (an incremental stores only the blocks that differ from its parent).

Every function runs inside the caller's transaction (`Database.write` / `read`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import apsw

from .. import protocol
from ..errors import Conflict, NotFound, Unprocessable
from . import agents, images, sessions
from .db import row

SCHEMA = """
CREATE TABLE direct_sessions (
    session_pk     INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    scid           TEXT,
    full_path      TEXT,
    image_type     TEXT,
    partial        INTEGER,
    bitmap         BLOB,
    used_count     INTEGER NOT NULL DEFAULT 0,
    received_count INTEGER NOT NULL DEFAULT 0,
    next_block     INTEGER,
    bytes_received INTEGER NOT NULL DEFAULT 0,
    created_at     REAL NOT NULL
) STRICT;
"""

#: Zero blocks announced per `sessions.record_keys` call when the bitmap is set.
ANNOUNCE_BATCH = 65536


@dataclass(frozen=True)
class FileInfo:
    """The snapshot file of a session (`o3ERemoteSnapshotFileInfo`)."""

    full_path: str
    scid: str
    block_size: int
    size: int
    volume_id: str
    image_type: str
    partial: bool


@dataclass(frozen=True)
class Block:
    """A used block that arrived, hashed and made ready to store (`data` as stored: the raw
    bytes for codec 0, one zstd frame for codec 1)."""

    index: int
    key: bytes
    raw_length: int
    codec: int
    data: bytes


# --------------------------------------------------------------------------
# Bitmaps
# --------------------------------------------------------------------------


def bitmap_length(block_count: int) -> int:
    return -(-block_count // 8)


def is_used(bitmap: bytes, index: int) -> bool:
    """Bit `index` (byte index//8, bit index%8, least significant bit first)."""
    return bool(bitmap[index >> 3] >> (index & 7) & 1)


def used_indices(bitmap: bytes, start: int, block_count: int) -> Iterator[int]:
    """The used block indices >= start, ascending (runs of zero bytes skipped at once)."""
    index = start
    size = len(bitmap)
    while index < block_count:
        byte = index >> 3
        if bitmap[byte] == 0:
            byte += 1
            while byte < size and bitmap[byte] == 0:
                byte += 1
            index = byte << 3
            continue
        if bitmap[byte] >> (index & 7) & 1:
            yield index
        index += 1


def used_count_from(bitmap: bytes, start: int) -> int:
    """How many used blocks have an index >= start."""
    if start >= len(bitmap) * 8:
        return 0
    return (int.from_bytes(bitmap[start >> 3 :], "little") >> (start & 7)).bit_count()


def check_bitmap(bitmap: bytes, block_count: int) -> None:
    """Unprocessable unless the bitmap has exactly one bit per block (no bit set past the
    last block)."""
    expected = bitmap_length(block_count)
    if len(bitmap) != expected:
        raise Unprocessable(
            f"the bitmap is {len(bitmap)} bytes; an image of {block_count} blocks needs"
            f" {expected} (one bit per block)",
            field="bitmap",
            expectedBytes=expected,
        )
    spare = block_count % 8
    if spare and bitmap[-1] >> spare:
        raise Unprocessable(
            f"the bitmap sets bits past the last block ({block_count - 1})", field="bitmap"
        )


@functools.lru_cache(maxsize=16)
def zero_record(length: int, level: int) -> tuple[bytes, int, bytes]:
    """(key, codec, stored data) of the record of a zero block of `length` bytes."""
    zeros = bytes(length)
    codec, data = protocol.compress_block(zeros, level)
    return protocol.record_key(zeros), codec, data


# --------------------------------------------------------------------------
# Lookups
# --------------------------------------------------------------------------


def state_of(conn: apsw.Connection, session_pk: int) -> dict[str, Any]:
    found = row(conn, "SELECT * FROM direct_sessions WHERE session_pk = ?", (session_pk,))
    if found is None:
        raise NotFound("this session is not a direct replication session")
    return found


def own(
    conn: apsw.Connection, core_pk: int, agent_id: str, job_id: str, session_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(session, direct state) of the caller's approved agent's open direct session; NotFound
    for anything else (another source's, ended, unknown)."""
    agent = agents.get(conn, core_pk, agent_id)
    if agent is None or agent["state"] != "approved":
        raise NotFound(
            f"this source has no approved agent {agent_id!r} on this core", field="agentId"
        )
    session = sessions.for_agent(conn, agent["id"], job_id, session_id)
    if session is None:
        raise NotFound(f"agent {agent_id} has no open session {session_id} in job {job_id}")
    found = row(conn, "SELECT * FROM direct_sessions WHERE session_pk = ?", (session["id"],))
    if found is None:
        raise NotFound(f"session {session_id} is not a direct replication session")
    return session, found


def progress(session: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """Where the transfer stands (part of most answers)."""
    return {
        "sessionId": session["session_id"],
        "blockCount": session["block_count"],
        "fileInfoSet": state["full_path"] is not None,
        "bitmapSet": state["bitmap"] is not None,
        "usedBlockCount": state["used_count"],
        "receivedBlockCount": state["received_count"],
        "nextBlockIndex": state["next_block"],
    }


def file_info(session: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The snapshot file as set by the source (Conflict before it is set)."""
    if state["full_path"] is None:
        raise Conflict("the snapshot file of this session is not set yet")
    return {
        "fullPath": state["full_path"],
        "openInfo": {
            "blockSize": session["block_size"],
            "scid": state["scid"],
            "size": session["size"],
            "volumeId": session["driver_volume_id"],
            "imageType": state["image_type"],
            "partial": bool(state["partial"]),
        },
    }


# --------------------------------------------------------------------------
# Opening, snapshot file, bitmap
# --------------------------------------------------------------------------


def open_session(
    conn: apsw.Connection, agent: dict[str, Any], request: sessions.SessionRequest, now: float
) -> dict[str, Any]:
    """Open the data-path session for `request` (or resume the identical open one) and make
    it a direct session."""
    answer = sessions.open_session(conn, agent, request, now)
    session = sessions.for_agent(conn, agent["id"], request.job_id, answer["sessionId"])
    assert session is not None
    conn.execute(
        "INSERT INTO direct_sessions(session_pk, created_at) VALUES (?, ?)"
        " ON CONFLICT (session_pk) DO NOTHING",
        (session["id"], now),
    )
    return {**answer, **progress(session, state_of(conn, session["id"]))}


def set_file(conn: apsw.Connection, session_pk: int, info: FileInfo) -> dict[str, Any]:
    """Record the snapshot file (SCID and file info); it must describe the session's image.
    It may be set again with other values until the bitmap is set."""
    session = sessions.get(conn, session_pk)
    state = state_of(conn, session_pk)
    for wire, given, expected in (
        ("openInfo.blockSize", info.block_size, session["block_size"]),
        ("openInfo.size", info.size, session["size"]),
        ("openInfo.volumeId", info.volume_id, session["driver_volume_id"]),
    ):
        if given != expected:
            raise Unprocessable(
                f"{wire} is {given!r}; the session's image has {expected!r}", field=wire
            )
    current = (state["full_path"], state["scid"], state["image_type"], state["partial"])
    wanted = (info.full_path, info.scid, info.image_type, int(info.partial))
    if state["bitmap"] is not None and current != wanted:
        raise Conflict(
            "the snapshot file cannot change once the bitmap is set; end the session to start over"
        )
    conn.execute(
        "UPDATE direct_sessions SET full_path = ?, scid = ?, image_type = ?, partial = ?"
        " WHERE session_pk = ?",
        (*wanted, session_pk),
    )
    return file_info(session, state_of(conn, session_pk))


def set_bitmap(
    conn: apsw.Connection,
    session_pk: int,
    bitmap: bytes,
    now: float,
    *,
    level: int = 1,
    disk_free: int | None = None,
) -> dict[str, Any]:
    """Set the used-block bitmap (once; the same bitmap again is accepted): announce the zero
    record for every block not in it, and commit at once when no block is used."""
    session = sessions.get(conn, session_pk)
    state = state_of(conn, session_pk)
    count = session["block_count"]
    check_bitmap(bitmap, count)
    if state["full_path"] is None:
        raise Conflict(
            "set the snapshot file (POST directreplication/slave/{agentId}/{jobId}/{sessionId})"
            " before the bitmap"
        )
    if state["bitmap"] is not None:
        if bytes(state["bitmap"]) != bitmap:
            raise Conflict(
                "this session's bitmap is already set to another one; end the session to start over"
            )
        return progress(session, state)
    used = used_count_from(bitmap, 0)
    first = next(used_indices(bitmap, 0, count), None)
    conn.execute(
        "UPDATE direct_sessions SET bitmap = ?, used_count = ?, next_block = ?"
        " WHERE session_pk = ?",
        (bitmap, used, first, session_pk),
    )
    size, block_size = session["size"], session["block_size"]
    batch: list[protocol.KeyEntry] = []
    records_of: dict[int, tuple[bytes, int, bytes]] = {}

    def announce() -> None:
        missing = sessions.record_keys(conn, session_pk, batch, now, disk_free=disk_free)
        wanted = []
        for index in missing:
            length = images.block_length(size, block_size, index)
            key, codec, data = records_of[length]
            wanted.append(sessions.VerifiedRecord(index, key, length, codec, data))
        if wanted:
            _, _, error = sessions.store_records(conn, session_pk, wanted, now)
            if error is not None:
                raise error
        batch.clear()

    for index in range(count):
        if is_used(bitmap, index):
            continue
        length = images.block_length(size, block_size, index)
        if length not in records_of:
            records_of[length] = zero_record(length, level)
        batch.append(protocol.KeyEntry(index, records_of[length][0], length))
        if len(batch) >= ANNOUNCE_BATCH:
            announce()
    if batch:
        announce()
    answer = progress(session, state_of(conn, session_pk))
    if used == 0:
        answer.update(commit(conn, session_pk, now))
    return answer


# --------------------------------------------------------------------------
# Data and commit
# --------------------------------------------------------------------------


def receive(
    conn: apsw.Connection,
    session_pk: int,
    blocks: list[Block],
    next_after: int | None,
    now: float,
    *,
    disk_free: int | None = None,
) -> dict[str, Any]:
    """Store the next used blocks (consecutive in the bitmap, starting at the session's
    `next_block`); `next_after` is the used block that follows them (None: they were the last,
    and the session is committed in this transaction)."""
    session = sessions.get(conn, session_pk)
    state = state_of(conn, session_pk)
    if state["bitmap"] is None:
        raise Conflict("send the bitmap before the data")
    expected = state["next_block"]
    if not blocks or blocks[0].index != expected:
        raise Conflict(
            f"the data must go on at block {expected}",
            field="X-O3E-Block-Index",
            nextBlockIndex=expected,
        )
    if next_after is not None and next_after <= blocks[-1].index:
        raise ValueError("next_after must follow the blocks")
    entries = [protocol.KeyEntry(b.index, b.key, b.raw_length) for b in blocks]
    missing = set(sessions.record_keys(conn, session_pk, entries, now, disk_free=disk_free))
    verified = [
        sessions.VerifiedRecord(b.index, b.key, b.raw_length, b.codec, b.data)
        for b in blocks
        if b.index in missing
    ]
    stored = 0
    if verified:
        stored, _, error = sessions.store_records(conn, session_pk, verified, now)
        if error is not None:
            raise error
    conn.execute(
        "UPDATE direct_sessions SET received_count = received_count + ?, next_block = ?,"
        " bytes_received = bytes_received + ? WHERE session_pk = ?",
        (len(blocks), next_after, sum(b.raw_length for b in blocks), session_pk),
    )
    answer = progress(session, state_of(conn, session_pk))
    answer.update(stored=stored, alreadyPresent=len(blocks) - stored, committed=False)
    if next_after is None:
        answer.update(commit(conn, session_pk, now))
    return answer


def commit(conn: apsw.Connection, session_pk: int, now: float) -> dict[str, Any]:
    """Commit the session through `sessions.commit`, with the checksum of the keys the target
    itself announced (every block of the image)."""
    session = sessions.get(conn, session_pk)
    checksum = protocol.KeyListChecksum()
    rows = conn.execute(
        "SELECT block_index, key FROM session_blocks WHERE session_pk = ? ORDER BY block_index",
        (session_pk,),
    )
    while part := list(islice(rows, sessions.COMMIT_STEP)):
        checksum.update_ascending(part)
    answer = sessions.commit(conn, session_pk, session["block_count"], checksum.hexdigest(), now)
    return {**answer, "nextBlockIndex": None}
