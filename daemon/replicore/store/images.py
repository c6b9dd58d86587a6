"""Volume images, their block maps, the recovery points they form, and reading an image back.

A volume image is `driverVolumeId:epochNumber` of one agent: block size, size in bytes, and
the epoch it builds on (`previous_epoch_number`, NULL for a base image). Its block map
(`image_blocks`) holds only the blocks whose key differs from what its parent resolves to;
block i of an image is found by walking the parent chain to the nearest image that holds it.
Each image remembers the repository its records live in, so a chain stays readable even if
an agent's later epochs went to another repository.

An image whose chain is broken (an epoch it builds on is not on this core) is orphaned: it is
kept, and cannot be read until the missing epoch arrives (a later push or a seed drive).
Epochs strictly decrease along a chain (the data path refuses a parent epoch that is not
lower), so walking a chain always ends.

A recovery point is the volume images of one agent taken at one time; it is `complete` once
all its `volume_count` images are committed.

Public readers others reuse: `read_image(conn, image_id)`, `orphan_reason(conn, image_id)`,
`find`, `latest`, `chain`, `resolve`. Writers (`attach_recovery_point`, `add_image`,
`insert_blocks`) are called by the commit in `store/sessions.py`, inside its transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apsw

from .. import protocol
from ..errors import ApiError, Conflict, NotFound
from . import records
from .db import row, rows

SCHEMA = """
CREATE TABLE recovery_points (
    id                INTEGER PRIMARY KEY,
    agent_pk          INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    recovery_point_id TEXT NOT NULL,
    timestamp         TEXT NOT NULL,
    volume_count      INTEGER NOT NULL CHECK (volume_count >= 1),
    complete          INTEGER NOT NULL DEFAULT 0,
    created_at        REAL NOT NULL,
    completed_at      REAL,
    UNIQUE (agent_pk, recovery_point_id)
) STRICT;
CREATE TABLE volume_images (
    id                    INTEGER PRIMARY KEY,
    agent_pk              INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    recovery_point_pk     INTEGER NOT NULL REFERENCES recovery_points(id) ON DELETE CASCADE,
    repository_id         INTEGER NOT NULL REFERENCES repositories(id),
    driver_volume_id      TEXT NOT NULL,
    epoch_number          INTEGER NOT NULL CHECK (epoch_number >= 0),
    previous_epoch_number INTEGER CHECK (previous_epoch_number < epoch_number),
    block_size            INTEGER NOT NULL,
    size                  INTEGER NOT NULL CHECK (size > 0),
    block_count           INTEGER NOT NULL,
    stored_block_count    INTEGER NOT NULL,
    keys_checksum         TEXT NOT NULL,
    session_id            TEXT NOT NULL,
    job_id                TEXT NOT NULL,
    committed_at          REAL NOT NULL,
    UNIQUE (agent_pk, driver_volume_id, epoch_number)
) STRICT;
CREATE INDEX volume_images_recovery_point ON volume_images(recovery_point_pk);
CREATE INDEX volume_images_session ON volume_images(session_id);
CREATE TABLE image_blocks (
    image_id    INTEGER NOT NULL REFERENCES volume_images(id) ON DELETE CASCADE,
    block_index INTEGER NOT NULL,
    key         BLOB NOT NULL,
    PRIMARY KEY (image_id, block_index)
) STRICT, WITHOUT ROWID;
"""

#: Bytes of blocks read back per step of `read_image` (bounds its memory).
READ_CHUNK_BYTES = 8 * 1024 * 1024


class OrphanedImage(Conflict):
    """The image builds on an epoch that is not on this core."""


class DamagedImage(ApiError):
    """A record the image needs is missing or does not match its key."""

    status, code = 500, "damaged_image"


def block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def block_length(size: int, block_size: int, index: int) -> int:
    """Length of block `index` of an image of `size` bytes (the last block may be short)."""
    return min(block_size, size - index * block_size)


def name(image: dict[str, Any]) -> str:
    """`driverVolumeId:epochNumber`, as the original addresses an image."""
    return f"{image['driver_volume_id']}:{image['epoch_number']}"


def get(conn: apsw.Connection, image_id: int) -> dict[str, Any]:
    found = row(conn, "SELECT * FROM volume_images WHERE id = ?", (image_id,))
    if found is None:
        raise NotFound(f"no volume image with id {image_id}")
    return found


def find(
    conn: apsw.Connection, agent_pk: int, driver_volume_id: str, epoch_number: int
) -> dict[str, Any] | None:
    return row(
        conn,
        "SELECT * FROM volume_images WHERE agent_pk = ? AND driver_volume_id = ?"
        " AND epoch_number = ?",
        (agent_pk, driver_volume_id, epoch_number),
    )


def latest(conn: apsw.Connection, agent_pk: int, driver_volume_id: str) -> dict[str, Any] | None:
    """The committed image of the volume with the highest epoch."""
    return row(
        conn,
        "SELECT * FROM volume_images WHERE agent_pk = ? AND driver_volume_id = ?"
        " ORDER BY epoch_number DESC LIMIT 1",
        (agent_pk, driver_volume_id),
    )


def committed_by_session(
    conn: apsw.Connection, agent_pk: int, session_id: str
) -> dict[str, Any] | None:
    """The image a session committed (sessions are deleted at commit; this outlives them)."""
    return row(
        conn,
        "SELECT * FROM volume_images WHERE session_id = ? AND agent_pk = ?",
        (session_id, agent_pk),
    )


def for_agent(conn: apsw.Connection, agent_pk: int) -> list[dict[str, Any]]:
    return rows(
        conn,
        "SELECT * FROM volume_images WHERE agent_pk = ? ORDER BY driver_volume_id, epoch_number",
        (agent_pk,),
    )


def chain(conn: apsw.Connection, image: dict[str, Any]) -> tuple[list[dict[str, Any]], int | None]:
    """The images `image` builds on, itself first, down to its base; and the first missing
    epoch when the chain is broken (None when it is whole)."""
    found = [image]
    current = image
    while current["previous_epoch_number"] is not None:
        parent = find(
            conn, current["agent_pk"], current["driver_volume_id"], current["previous_epoch_number"]
        )
        if parent is None:
            return found, current["previous_epoch_number"]
        found.append(parent)
        current = parent
    return found, None


def orphan_reason(conn: apsw.Connection, image_id: int) -> str | None:
    """Why the image cannot be read (the epoch missing from its chain), or None if it can."""
    image = get(conn, image_id)
    _, missing = chain(conn, image)
    if missing is None:
        return None
    return (
        f"volume image {name(image)} is orphaned: epoch {missing} of volume "
        f"{image['driver_volume_id']}, which it builds on, is not on this core"
    )


def resolve(
    conn: apsw.Connection, images: list[dict[str, Any]], start: int, stop: int
) -> dict[int, tuple[bytes, int]]:
    """Block index -> (key, repository id) for blocks [start, stop) as the chain `images`
    (nearest first) resolves them; indices no image of the chain holds are left out."""
    resolved: dict[int, tuple[bytes, int]] = {}
    wanted = stop - start
    for image in images:
        repository_id = image["repository_id"]
        for index, key in conn.execute(
            "SELECT block_index, key FROM image_blocks"
            " WHERE image_id = ? AND block_index >= ? AND block_index < ?",
            (image["id"], start, stop),
        ):
            if index not in resolved:
                resolved[index] = (key, repository_id)
        if len(resolved) == wanted:
            break
    return resolved


def read_image(conn: apsw.Connection, image_id: int, *, verify: bool = True) -> Iterator[bytes]:
    """The image's blocks in order, exact bytes (the last one short when the size is not a
    multiple of the block size). Raises OrphanedImage before yielding anything for a broken
    chain, DamagedImage if a record is missing or (with `verify`) does not match its key.
    Run it inside one read transaction for a consistent snapshot."""
    image = get(conn, image_id)
    images, missing = chain(conn, image)
    if missing is not None:
        raise OrphanedImage(orphan_reason(conn, image_id) or "orphaned image")
    size, block_size, count = image["size"], image["block_size"], image["block_count"]
    step = max(1, READ_CHUNK_BYTES // block_size)
    for start in range(0, count, step):
        stop = min(count, start + step)
        resolved = resolve(conn, images, start, stop)
        if len(resolved) != stop - start:
            absent = next(i for i in range(start, stop) if i not in resolved)
            raise DamagedImage(f"volume image {name(image)} has no key for block {absent}")
        by_repository: dict[int, list[bytes]] = {}
        for key, repository_id in resolved.values():
            by_repository.setdefault(repository_id, []).append(key)
        stored: dict[tuple[int, bytes], records.StoredRecord] = {}
        for repository_id, keys in by_repository.items():
            for key, record in records.fetch(conn, repository_id, keys).items():
                stored[(repository_id, key)] = record
        for index in range(start, stop):
            key, repository_id = resolved[index]
            record = stored.get((repository_id, key))
            if record is None:
                raise DamagedImage(
                    f"volume image {name(image)}: the record of block {index} is missing"
                )
            try:
                data = protocol.decompress_record(record.codec, record.data, record.raw_length)
            except protocol.ProtocolError as error:
                raise DamagedImage(
                    f"volume image {name(image)}: the record of block {index} is damaged: {error}"
                ) from None
            if len(data) != block_length(size, block_size, index) or (
                verify and protocol.record_key(data) != key
            ):
                raise DamagedImage(
                    f"volume image {name(image)}: the record of block {index} does not match"
                    " its key"
                )
            yield data


# --------------------------------------------------------------------------
# Recovery points
# --------------------------------------------------------------------------


def find_recovery_point(
    conn: apsw.Connection, agent_pk: int, recovery_point_id: str
) -> dict[str, Any] | None:
    return row(
        conn,
        "SELECT * FROM recovery_points WHERE agent_pk = ? AND recovery_point_id = ?",
        (agent_pk, recovery_point_id),
    )


def recovery_point_images(conn: apsw.Connection, recovery_point_pk: int) -> list[dict[str, Any]]:
    return rows(
        conn,
        "SELECT * FROM volume_images WHERE recovery_point_pk = ? ORDER BY driver_volume_id",
        (recovery_point_pk,),
    )


def check_recovery_point(
    conn: apsw.Connection,
    agent_pk: int,
    recovery_point_id: str,
    timestamp: str,
    volume_count: int,
    driver_volume_id: str,
) -> dict[str, Any] | None:
    """Raise Conflict unless an image of `driver_volume_id` may join the recovery point
    (same timestamp and volume count as recorded, volume not in it yet, room left); returns
    the recovery point when it exists."""
    point = find_recovery_point(conn, agent_pk, recovery_point_id)
    if point is None:
        return None
    if point["timestamp"] != timestamp:
        raise Conflict(
            f"recovery point {recovery_point_id} has timestamp {point['timestamp']}",
            field="recoveryPointTimestamp",
        )
    if point["volume_count"] != volume_count:
        raise Conflict(
            f"recovery point {recovery_point_id} has {point['volume_count']} volumes",
            field="volumeCount",
        )
    held = recovery_point_images(conn, point["id"])
    for image in held:
        if image["driver_volume_id"] == driver_volume_id:
            raise Conflict(
                f"recovery point {recovery_point_id} already holds volume image {name(image)}",
                field="recoveryPointId",
            )
    if len(held) >= point["volume_count"]:
        raise Conflict(
            f"recovery point {recovery_point_id} already has all its"
            f" {point['volume_count']} volumes",
            field="recoveryPointId",
        )
    return point


def attach_recovery_point(
    conn: apsw.Connection,
    agent_pk: int,
    recovery_point_id: str,
    timestamp: str,
    volume_count: int,
    driver_volume_id: str,
    now: float,
) -> int:
    """The recovery point an image of `driver_volume_id` joins, created when new; Conflict
    as `check_recovery_point`."""
    point = check_recovery_point(
        conn, agent_pk, recovery_point_id, timestamp, volume_count, driver_volume_id
    )
    if point is not None:
        return int(point["id"])
    conn.execute(
        "INSERT INTO recovery_points(agent_pk, recovery_point_id, timestamp, volume_count,"
        " created_at) VALUES (?, ?, ?, ?, ?)",
        (agent_pk, recovery_point_id, timestamp, volume_count, now),
    )
    return conn.last_insert_rowid()


def settle_recovery_point(conn: apsw.Connection, recovery_point_pk: int, now: float) -> bool:
    """Mark the recovery point complete once all its volumes are in; True when complete."""
    point = row(conn, "SELECT * FROM recovery_points WHERE id = ?", (recovery_point_pk,))
    assert point is not None
    if point["complete"]:
        return True
    held = conn.execute(
        "SELECT count(*) FROM volume_images WHERE recovery_point_pk = ?", (recovery_point_pk,)
    ).fetchone()[0]
    if held < point["volume_count"]:
        return False
    conn.execute(
        "UPDATE recovery_points SET complete = 1, completed_at = ? WHERE id = ?",
        (now, recovery_point_pk),
    )
    return True


# --------------------------------------------------------------------------
# Writing images (inside the commit transaction)
# --------------------------------------------------------------------------


def add_image(conn: apsw.Connection, fields: dict[str, Any]) -> int:
    """Insert a volume image row (its blocks follow with `insert_blocks`)."""
    columns = ",".join(fields)
    marks = ",".join("?" * len(fields))
    conn.execute(f"INSERT INTO volume_images({columns}) VALUES ({marks})", tuple(fields.values()))
    return conn.last_insert_rowid()


def insert_blocks(conn: apsw.Connection, image_id: int, blocks: Iterable[tuple[int, bytes]]) -> int:
    """Add (block index, key) pairs to the image's block map; returns how many."""
    batch = [(image_id, index, key) for index, key in blocks]
    if batch:
        conn.executemany(
            "INSERT INTO image_blocks(image_id, block_index, key) VALUES (?, ?, ?)", batch
        )
    return len(batch)


def insert_changed_blocks(
    conn: apsw.Connection,
    image_id: int,
    parent_chain: list[dict[str, Any]],
    repository_id: int,
    start: int,
    stop: int,
    blocks: list[tuple[int, bytes]],
) -> int:
    """Add those of `blocks` ((index, key) pairs in [start, stop)) whose key differs from the
    one `parent_chain` resolves there (all of them when there is no parent); how many."""
    if parent_chain:
        resolved = resolve(conn, parent_chain, start, stop)
        blocks = [(i, key) for i, key in blocks if resolved.get(i) != (key, repository_id)]
    return insert_blocks(conn, image_id, blocks)


def set_stored_block_count(conn: apsw.Connection, image_id: int, count: int) -> None:
    conn.execute("UPDATE volume_images SET stored_block_count = ? WHERE id = ?", (count, image_id))
