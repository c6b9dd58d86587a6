"""Volume-image sessions: the open transfer of one image, its key list, its quota reservation,
and the commit that turns it into a visible volume image.

A session is one `driverVolumeId:epochNumber` of one agent being pushed (at most one open
session per epoch). `session_blocks` holds the key announced for each block index (a later
announcement of the same index replaces the earlier one). A block is *transferred* when its
key is announced and the repository holds that key's record: the record row itself is the
mark, written in the transaction that stores the record, so nothing but a durable record can
set it, and a record that arrived through another session (or was already there) counts too.

Quota: announcing keys reserves the uncompressed size of the records the repository lacks,
each distinct key once per session (`session_reservations`, totalled in
`sessions.reserved_bytes`); storing a record releases its reservation, and commit, discard
and expiry release what is left. A repository's room is its quota minus its used bytes
(`repositories.used_bytes`) minus the reservations of its open sessions.

An incremental session (`previous_epoch_number` set) may announce every block or only the
changed ones: at commit, blocks it did not announce are inherited from the parent image when
the parent's chain is whole and covers them. The committed image stores only the blocks whose
key differs from what the parent resolves to. An incremental whose parent epoch is not on this
core is accepted (orphaned until the parent arrives) but must then announce every block.

Every function here runs inside the caller's transaction (`Database.write` / `read`).
"""

from __future__ import annotations

import bisect
import uuid
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import apsw

from .. import metrics, protocol
from ..errors import Conflict, InsufficientStorage, NotFound, Unprocessable
from . import images, records, repositories
from .db import row, rows, rows_in

SCHEMA = """
CREATE TABLE sessions (
    id                       INTEGER PRIMARY KEY,
    session_id               TEXT NOT NULL UNIQUE,
    agent_pk                 INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    repository_id            INTEGER NOT NULL REFERENCES repositories(id),
    job_id                   TEXT NOT NULL,
    driver_volume_id         TEXT NOT NULL,
    epoch_number             INTEGER NOT NULL CHECK (epoch_number >= 0),
    previous_epoch_number    INTEGER CHECK (previous_epoch_number < epoch_number),
    block_size               INTEGER NOT NULL,
    size                     INTEGER NOT NULL CHECK (size > 0),
    block_count              INTEGER NOT NULL,
    recovery_point_id        TEXT NOT NULL,
    recovery_point_timestamp TEXT NOT NULL,
    volume_count             INTEGER NOT NULL CHECK (volume_count >= 1),
    reserved_bytes           INTEGER NOT NULL DEFAULT 0 CHECK (reserved_bytes >= 0),
    created_at               REAL NOT NULL,
    last_activity_at         REAL NOT NULL,
    UNIQUE (agent_pk, driver_volume_id, epoch_number)
) STRICT;
CREATE INDEX sessions_repository ON sessions(repository_id);
CREATE TABLE session_blocks (
    session_pk  INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    block_index INTEGER NOT NULL,
    key         BLOB NOT NULL,
    PRIMARY KEY (session_pk, block_index)
) STRICT, WITHOUT ROWID;
CREATE TABLE session_reservations (
    session_pk INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    key        BLOB NOT NULL,
    raw_length INTEGER NOT NULL,
    PRIMARY KEY (session_pk, key)
) STRICT, WITHOUT ROWID;
"""

#: Blocks of the session handled per step of the commit's diff against the parent.
COMMIT_STEP = 16384

_TRANSFERRED = (
    "EXISTS (SELECT 1 FROM records r WHERE r.repository_id = s.repository_id AND r.key = b.key)"
)


@dataclass(frozen=True)
class SessionRequest:
    """The image a source wants to push (the body of `slave/sessions/new`, validated)."""

    job_id: str
    driver_volume_id: str
    epoch_number: int
    previous_epoch_number: int | None
    block_size: int
    size: int
    recovery_point_id: str
    recovery_point_timestamp: str
    volume_count: int

    @property
    def block_count(self) -> int:
        return images.block_count(self.size, self.block_size)


#: Fields that make a request "identical" to an open session (the job id may change when a
#: restarted source resumes), with their wire names.
_IDENTITY = [
    ("previous_epoch_number", "previousEpochNumber"),
    ("block_size", "blockSize"),
    ("size", "size"),
    ("recovery_point_id", "recoveryPointId"),
    ("recovery_point_timestamp", "recoveryPointTimestamp"),
    ("volume_count", "volumeCount"),
]


# --------------------------------------------------------------------------
# Lookups
# --------------------------------------------------------------------------


def get(conn: apsw.Connection, session_pk: int) -> dict[str, Any]:
    """The open session, or NotFound (it was committed, discarded or expired)."""
    found = row(conn, "SELECT * FROM sessions WHERE id = ?", (session_pk,))
    if found is None:
        raise NotFound("the session has ended (committed, discarded or expired)")
    return found


def for_agent(
    conn: apsw.Connection, agent_pk: int, job_id: str, session_id: str
) -> dict[str, Any] | None:
    """The agent's open session `session_id` of job `job_id`."""
    return row(
        conn,
        "SELECT * FROM sessions WHERE session_id = ? AND agent_pk = ? AND job_id = ?",
        (session_id, agent_pk, job_id),
    )


def for_core(conn: apsw.Connection, core_pk: int, session_id: str) -> dict[str, Any] | None:
    """The open session `session_id` of any agent of the source `core_pk`."""
    return row(
        conn,
        "SELECT s.* FROM sessions s JOIN agents a ON a.id = s.agent_pk"
        " WHERE s.session_id = ? AND a.core_pk = ?",
        (session_id, core_pk),
    )


def for_epoch(
    conn: apsw.Connection, agent_pk: int, driver_volume_id: str, epoch_number: int
) -> dict[str, Any] | None:
    return row(
        conn,
        "SELECT * FROM sessions WHERE agent_pk = ? AND driver_volume_id = ? AND epoch_number = ?",
        (agent_pk, driver_volume_id, epoch_number),
    )


def open_sessions(conn: apsw.Connection) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM sessions ORDER BY created_at")


def open_count(conn: apsw.Connection) -> int:
    """Open sessions on this core (the `sessions_open` figure of metrics and status)."""
    return int(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])


metrics.register_count("sessions_open", open_count)


def reserved_bytes(conn: apsw.Connection, repository_id: int) -> int:
    """Bytes reserved in the repository by its open sessions."""
    return int(
        conn.execute(
            "SELECT coalesce(sum(reserved_bytes), 0) FROM sessions WHERE repository_id = ?",
            (repository_id,),
        ).fetchone()[0]
    )


def room(conn: apsw.Connection, repository_id: int) -> int | None:
    """Bytes the repository's quota still allows (may be negative); None without a quota."""
    repository = repositories.by_id(conn, repository_id)
    if repository["quota_bytes"] is None:
        return None
    return int(
        repository["quota_bytes"]
        - repositories.used_bytes(conn, repository_id)
        - reserved_bytes(conn, repository_id)
    )


def transferred_count(conn: apsw.Connection, session: dict[str, Any]) -> int:
    return int(
        conn.execute(
            "SELECT count(*) FROM session_blocks b JOIN sessions s ON s.id = b.session_pk"
            f" WHERE b.session_pk = ? AND {_TRANSFERRED}",
            (session["id"],),
        ).fetchone()[0]
    )


def transferred_bitmap(conn: apsw.Connection, session: dict[str, Any]) -> bytes:
    """ceil(blockCount/8) bytes; bit i (byte i//8, bit i%8, LSB first) set when block i's key
    is announced and its record is durable in the repository."""
    bits = bytearray(-(-session["block_count"] // 8))
    for (index,) in conn.execute(
        "SELECT b.block_index FROM session_blocks b JOIN sessions s ON s.id = b.session_pk"
        f" WHERE b.session_pk = ? AND {_TRANSFERRED}",
        (session["id"],),
    ):
        bits[index >> 3] |= 1 << (index & 7)
    return bytes(bits)


def full_bitmap(block_count: int) -> bytes:
    """The bitmap of a committed image: every block present."""
    bits = bytearray(b"\xff" * (-(-block_count // 8)))
    if block_count % 8:
        bits[-1] = (1 << (block_count % 8)) - 1
    return bytes(bits)


def describe(conn: apsw.Connection, session: dict[str, Any], resumed: bool) -> dict[str, Any]:
    """The answer of `sessions/new`."""
    return {
        "sessionId": session["session_id"],
        "resumed": resumed,
        "blockCount": session["block_count"],
        "transferredBlockCount": transferred_count(conn, session) if resumed else 0,
    }


# --------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------


def open_session(
    conn: apsw.Connection, agent: dict[str, Any], request: SessionRequest, now: float
) -> dict[str, Any]:
    """Open a session for `request` (or return the identical open one, resumed)."""
    if agent["repository_id"] is None:
        raise Conflict(f"agent {agent['agent_id']} has no repository on this core")
    volume, epoch = request.driver_volume_id, request.epoch_number
    if images.find(conn, agent["id"], volume, epoch) is not None:
        newest = images.latest(conn, agent["id"], volume)
        assert newest is not None
        raise Conflict(
            f"volume image {volume}:{epoch} is already committed",
            field="epochNumber",
            committedEpochNumber=newest["epoch_number"],
        )
    existing = for_epoch(conn, agent["id"], volume, epoch)
    if existing is not None:
        for column, wire in _IDENTITY:
            if existing[column] != getattr(request, column):
                raise Conflict(
                    f"session {existing['session_id']} for {volume}:{epoch} is open with another"
                    f" {wire} ({existing[column]!r}); end it with commit=false to start over",
                    field=wire,
                    sessionId=existing["session_id"],
                )
        conn.execute(
            "UPDATE sessions SET job_id = ?, last_activity_at = ? WHERE id = ?",
            (request.job_id, now, existing["id"]),
        )
        return describe(conn, existing, resumed=True)
    if request.previous_epoch_number is not None:
        parent = images.find(conn, agent["id"], volume, request.previous_epoch_number)
        if parent is not None and parent["block_size"] != request.block_size:
            raise Unprocessable(
                f"the parent image {images.name(parent)} has block size {parent['block_size']};"
                " an incremental image keeps its parent's block size",
                field="blockSize",
            )
    images.check_recovery_point(
        conn,
        agent["id"],
        request.recovery_point_id,
        request.recovery_point_timestamp,
        request.volume_count,
        volume,
    )
    left = room(conn, agent["repository_id"])
    if left is not None and left <= 0:
        raise InsufficientStorage(
            "the repository's quota is used up", repository=agent["repository_id"]
        )
    session_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO sessions(session_id, agent_pk, repository_id, job_id, driver_volume_id,"
        " epoch_number, previous_epoch_number, block_size, size, block_count,"
        " recovery_point_id, recovery_point_timestamp, volume_count, created_at,"
        " last_activity_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            session_id,
            agent["id"],
            agent["repository_id"],
            request.job_id,
            volume,
            epoch,
            request.previous_epoch_number,
            request.block_size,
            request.size,
            request.block_count,
            request.recovery_point_id,
            request.recovery_point_timestamp,
            request.volume_count,
            now,
            now,
        ),
    )
    return {
        "sessionId": session_id,
        "resumed": False,
        "blockCount": request.block_count,
        "transferredBlockCount": 0,
    }


# --------------------------------------------------------------------------
# Keys and records
# --------------------------------------------------------------------------


def check_key_entries(
    session: dict[str, Any], entries: list[protocol.KeyEntry]
) -> list[protocol.KeyEntry]:
    """Raise Unprocessable (naming the block index) for an entry outside the image, of the
    wrong length, or repeated within the batch. Pure: no database."""
    count, size, block_size = session["block_count"], session["size"], session["block_size"]
    seen: set[int] = set()
    for index, _key, length in entries:
        if index >= count:
            raise Unprocessable(
                f"block index {index} is outside the image (blocks 0..{count - 1})",
                blockIndex=index,
            )
        expected = images.block_length(size, block_size, index)
        if length != expected:
            raise Unprocessable(
                f"block {index} is {expected} bytes long, the entry says {length}",
                blockIndex=index,
            )
        if index in seen:
            raise Unprocessable(f"block index {index} appears twice in the batch", blockIndex=index)
        seen.add(index)
    return entries


def _reserved_keys(conn: apsw.Connection, session_pk: int, keys: list[bytes]) -> set[bytes]:
    return {
        key
        for (key,) in rows_in(
            conn,
            "SELECT key FROM session_reservations WHERE session_pk = ? AND key IN ({marks})",
            (session_pk,),
            keys,
        )
    }


def record_keys(
    conn: apsw.Connection,
    session_pk: int,
    entries: list[protocol.KeyEntry],
    now: float,
    *,
    disk_free: int | None = None,
) -> list[int]:
    """Record a checked batch of key entries; returns the indices to send records for.

    Only the repository is consulted. When several blocks of the batch carry the same missing
    key, only the first is listed (its record serves them all). The uncompressed size of each
    missing key not yet reserved by this session is reserved; if the quota (or `disk_free`,
    less every open session's reservation) cannot hold it, InsufficientStorage is raised and
    the transaction (keys included) rolls back."""
    session = get(conn, session_pk)
    conn.executemany(
        "INSERT INTO session_blocks(session_pk, block_index, key) VALUES (?, ?, ?)"
        " ON CONFLICT (session_pk, block_index) DO UPDATE SET key = excluded.key",
        [(session_pk, entry.index, entry.key) for entry in entries],
    )
    lengths: dict[bytes, int] = {}
    for entry in entries:
        lengths.setdefault(entry.key, entry.length)
    present = records.present_keys(conn, session["repository_id"], lengths)
    missing: list[int] = []
    asked: set[bytes] = set()
    for entry in entries:
        if entry.key in present or entry.key in asked:
            continue
        asked.add(entry.key)
        missing.append(entry.index)
    wanted = list(asked)
    already = _reserved_keys(conn, session_pk, wanted)
    new = [(session_pk, key, lengths[key]) for key in wanted if key not in already]
    needed = sum(length for _, _, length in new)
    if needed:
        left = room(conn, session["repository_id"])
        if left is not None and needed > left:
            raise InsufficientStorage(
                f"the repository's quota has {max(left, 0)} bytes left; the records this batch"
                f" lacks need {needed} bytes",
                neededBytes=needed,
                availableBytes=max(left, 0),
                missingRecords=len(new),
            )
        if disk_free is not None:
            reserved_everywhere = conn.execute(
                "SELECT coalesce(sum(reserved_bytes), 0) FROM sessions"
            ).fetchone()[0]
            if needed > disk_free - reserved_everywhere:
                raise InsufficientStorage(
                    f"the disk has {disk_free} bytes free, {reserved_everywhere} of them"
                    f" reserved; the records this batch lacks need {needed} bytes",
                    neededBytes=needed,
                    availableBytes=max(disk_free - reserved_everywhere, 0),
                    missingRecords=len(new),
                )
        conn.executemany(
            "INSERT INTO session_reservations(session_pk, key, raw_length) VALUES (?, ?, ?)", new
        )
    conn.execute(
        "UPDATE sessions SET reserved_bytes = reserved_bytes + ?, last_activity_at = ?"
        " WHERE id = ?",
        (needed, now, session_pk),
    )
    return missing


@dataclass(frozen=True)
class VerifiedRecord:
    """A record whose payload decompressed to bytes matching its key."""

    index: int
    key: bytes
    raw_length: int
    codec: int
    data: bytes | memoryview


def _announced_keys(conn: apsw.Connection, session_pk: int, indices: list[int]) -> dict[int, bytes]:
    return dict(
        rows_in(
            conn,
            "SELECT block_index, key FROM session_blocks"
            " WHERE session_pk = ? AND block_index IN ({marks})",
            (session_pk,),
            indices,
        )
    )


def _release_reservations(conn: apsw.Connection, session_pk: int, keys: list[bytes]) -> int:
    """Drop the reservations of `keys` (their records are stored); the bytes released."""
    return sum(
        length
        for (length,) in rows_in(
            conn,
            "DELETE FROM session_reservations WHERE session_pk = ? AND key IN ({marks})"
            " RETURNING raw_length",
            (session_pk,),
            keys,
        )
    )


def store_records(
    conn: apsw.Connection, session_pk: int, batch: list[VerifiedRecord], now: float
) -> tuple[int, int, Unprocessable | None]:
    """Store verified records in order, each once per repository, until one is not a block
    whose announced key it carries. Returns (stored, already present, the error that stopped
    it or None); what was stored before the error is kept (the caller commits)."""
    session = get(conn, session_pk)
    count = session["block_count"]
    announced = _announced_keys(
        conn, session_pk, sorted({record.index for record in batch if record.index < count})
    )
    accepted: list[VerifiedRecord] = []
    error: Unprocessable | None = None
    for record in batch:
        index = record.index
        key = announced.get(index) if index < count else None
        if index >= count:
            error = Unprocessable(
                f"block index {index} is outside the image (blocks 0..{count - 1})",
                blockIndex=index,
            )
        elif key is None:
            error = Unprocessable(
                f"block {index} has no key announced in this session", blockIndex=index
            )
        elif key != record.key:
            error = Unprocessable(
                f"the record sent for block {index} is not the one its announced key names",
                blockIndex=index,
            )
        if error is not None:
            break
        accepted.append(record)
    repository_id = session["repository_id"]
    keys = list(dict.fromkeys(record.key for record in accepted))
    present = records.present_keys(conn, repository_id, keys)
    fresh: dict[bytes, VerifiedRecord] = {}
    for record in accepted:
        if record.key not in present:
            fresh.setdefault(record.key, record)
    records.insert_many(
        conn, repository_id, ((r.key, r.raw_length, r.codec, r.data) for r in fresh.values()), now
    )
    released = _release_reservations(conn, session_pk, keys)
    conn.execute(
        "UPDATE sessions SET reserved_bytes = reserved_bytes - ?, last_activity_at = ?"
        " WHERE id = ?",
        (released, now, session_pk),
    )
    return len(fresh), len(accepted) - len(fresh), error


# --------------------------------------------------------------------------
# Ending
# --------------------------------------------------------------------------


def _delete(conn: apsw.Connection, session_pk: int) -> None:
    conn.execute("DELETE FROM session_blocks WHERE session_pk = ?", (session_pk,))
    conn.execute("DELETE FROM session_reservations WHERE session_pk = ?", (session_pk,))
    conn.execute("DELETE FROM sessions WHERE id = ?", (session_pk,))


def discard(conn: apsw.Connection, session_pk: int) -> None:
    """End the session without an image; the records it brought stay (deduplication)."""
    get(conn, session_pk)
    _delete(conn, session_pk)


def expire(conn: apsw.Connection, idle_before: float, keep: frozenset[str]) -> list[str]:
    """Discard sessions idle since before `idle_before` (except `keep`); their ids."""
    found = [
        r
        for r in rows(
            conn,
            "SELECT id, session_id FROM sessions WHERE last_activity_at < ?",
            (idle_before,),
        )
        if r["session_id"] not in keep
    ]
    for session in found:
        _delete(conn, session["id"])
    return [r["session_id"] for r in found]


def commit(
    conn: apsw.Connection, session_pk: int, block_count: int, keys_checksum: str, now: float
) -> dict[str, Any]:
    """Check that every block of the image has a key and a record, and that the key list is
    the one the source sent (count and checksum), then make the image visible, complete its
    recovery point if this was the last volume, and end the session: all in the caller's one
    transaction. Unprocessable (nothing changed, the session stays open) otherwise."""
    session = get(conn, session_pk)
    count, block_size = session["block_count"], session["block_size"]
    if block_count != count:
        raise Unprocessable(
            f"blockCount {block_count} differs from the image's {count} blocks",
            field="blockCount",
        )
    agent_pk, volume = session["agent_pk"], session["driver_volume_id"]
    parent = None
    if session["previous_epoch_number"] is not None:
        parent = images.find(conn, agent_pk, volume, session["previous_epoch_number"])
    parent_chain: list[dict[str, Any]] = []
    inherit_limit = 0
    if parent is not None:
        if parent["block_size"] != block_size:
            raise Conflict(
                f"the parent image {images.name(parent)} has block size {parent['block_size']}",
                field="blockSize",
            )
        parent_chain, broken_at = images.chain(conn, parent)
        if broken_at is None:
            inherit_limit = min(count, parent["block_count"])
    with conn:  # a savepoint: the image's rows go in before the checks that may refuse it
        return _add_image(conn, session, parent, parent_chain, inherit_limit, keys_checksum, now)


def _add_image(
    conn: apsw.Connection,
    session: dict[str, Any],
    parent: dict[str, Any] | None,
    parent_chain: list[dict[str, Any]],
    inherit_limit: int,
    keys_checksum: str,
    now: float,
) -> dict[str, Any]:
    """The checks and writes of `commit` once the parent is known."""
    session_pk, count, size = session["id"], session["block_count"], session["size"]
    volume, block_size = session["driver_volume_id"], session["block_size"]
    agent_pk, repository_id = session["agent_pk"], session["repository_id"]
    point_pk = images.attach_recovery_point(
        conn,
        agent_pk,
        session["recovery_point_id"],
        session["recovery_point_timestamp"],
        session["volume_count"],
        volume,
        now,
    )
    image_id = images.add_image(
        conn,
        {
            "agent_pk": agent_pk,
            "recovery_point_pk": point_pk,
            "repository_id": repository_id,
            "driver_volume_id": volume,
            "epoch_number": session["epoch_number"],
            "previous_epoch_number": session["previous_epoch_number"],
            "block_size": block_size,
            "size": size,
            "block_count": count,
            "stored_block_count": 0,
            "keys_checksum": keys_checksum.lower(),
            "session_id": session["session_id"],
            "job_id": session["job_id"],
            "committed_at": now,
        },
    )
    # One pass over the key list, a step at a time: its checksum, and against a parent the
    # blocks whose key differs (stored before the checks below: their failure rolls it back).
    checksum = protocol.KeyListChecksum()
    announced = announced_below = stored = 0
    for start in range(0, count, COMMIT_STEP):
        stop = min(count, start + COMMIT_STEP)
        blocks = conn.execute(
            "SELECT block_index, key FROM session_blocks"
            " WHERE session_pk = ? AND block_index >= ? AND block_index < ?"
            " ORDER BY block_index",
            (session_pk, start, stop),
        ).fetchall()
        checksum.update_ascending(blocks)
        announced += len(blocks)
        if start < inherit_limit:
            announced_below += bisect.bisect_left(blocks, inherit_limit, key=itemgetter(0))
        if parent_chain:
            stored += images.insert_changed_blocks(
                conn, image_id, parent_chain, repository_id, start, stop, blocks
            )
    without_record = conn.execute(
        "SELECT count(*) FROM session_blocks b WHERE b.session_pk = ? AND NOT EXISTS"
        " (SELECT 1 FROM records r WHERE r.repository_id = ? AND r.key = b.key)",
        (session_pk, repository_id),
    ).fetchone()[0]
    inherited = inherit_limit - announced_below
    edge = inherit_limit - 1
    if (
        inherited
        and images.block_length(size, block_size, edge)
        != images.block_length(parent["size"] if parent else 0, block_size, edge)
        and row(
            conn,
            "SELECT 1 AS x FROM session_blocks WHERE session_pk = ? AND block_index = ?",
            (session_pk, edge),
        )
        is None
    ):
        inherited -= 1  # the parent's block there has another length: it cannot be inherited
    without_key = count - announced - inherited
    missing = without_key + without_record
    if missing:
        parts = []
        if without_key:
            parts.append(f"{without_key} without a key")
        if without_record:
            parts.append(f"{without_record} whose record has not arrived")
        raise Unprocessable(
            f"{missing} of {count} blocks are missing ({', '.join(parts)});"
            " the session stays open for the rest",
            missingBlocks=missing,
            blocksWithoutKey=without_key,
            blocksWithoutRecord=without_record,
        )
    if checksum.hexdigest() != keys_checksum.lower():
        raise Unprocessable(
            f"keysChecksum differs from the checksum of the {announced} key entries"
            " recorded for this session",
            field="keysChecksum",
        )
    if not parent_chain:
        conn.execute(
            "INSERT INTO image_blocks(image_id, block_index, key)"
            " SELECT ?, block_index, key FROM session_blocks WHERE session_pk = ?",
            (image_id, session_pk),
        )
        stored = announced
    images.set_stored_block_count(conn, image_id, stored)
    complete = images.settle_recovery_point(conn, point_pk, now)
    _delete(conn, session_pk)
    return {
        "committed": True,
        "volumeImage": f"{volume}:{session['epoch_number']}",
        "recoveryPointComplete": complete,
    }
