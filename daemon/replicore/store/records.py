"""Records: the content-addressed blocks of every image, stored once per repository.

A record is the bytes of one block, keyed by its BLAKE3-256 key (`protocol.record_key` of the
uncompressed bytes) and kept in the form it arrived in: a zstd frame (codec 1) or the raw
bytes (codec 0). The target does not recompress codec-0 records: a well-behaved client sends
codec 0 only when zstd did not make the block smaller (docs/protocol.md), so compressing it
again would spend the server's CPU (the scarce resource on a 2-core appliance) for nothing; a
client that sends compressible data raw only fills its own tenant's quota.

The table is an ordinary rowid table with a unique index on (repository_id, key): measured
about twice as fast for bulk blob inserts as a WITHOUT ROWID table (STACK-NOTES), and the
index alone answers "which of these keys are present" without touching the blobs.

`record_usage` holds per-repository totals (count, stored bytes, raw bytes), maintained by
triggers on every insert and delete, so that quota checks stay O(1) whoever adds or removes
records (the data path, seed drives, GC). `used_bytes` is registered in
`repositories.USAGE_SOURCES`: a repository's records count with their stored (compressed) size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import apsw

from . import repositories
from .db import rows_in

SCHEMA = """
CREATE TABLE records (
    id            INTEGER PRIMARY KEY,
    repository_id INTEGER NOT NULL REFERENCES repositories(id),
    key           BLOB NOT NULL CHECK (length(key) = 32),
    raw_length    INTEGER NOT NULL CHECK (raw_length > 0),
    codec         INTEGER NOT NULL CHECK (codec IN (0, 1)),
    stored_length INTEGER NOT NULL CHECK (stored_length > 0),
    data          BLOB NOT NULL,
    created_at    REAL NOT NULL
) STRICT;
CREATE UNIQUE INDEX records_key ON records(repository_id, key);
CREATE TABLE record_usage (
    repository_id INTEGER PRIMARY KEY REFERENCES repositories(id) ON DELETE CASCADE,
    record_count  INTEGER NOT NULL,
    stored_bytes  INTEGER NOT NULL,
    raw_bytes     INTEGER NOT NULL
) STRICT;
CREATE TRIGGER records_usage_insert AFTER INSERT ON records BEGIN
    INSERT INTO record_usage(repository_id, record_count, stored_bytes, raw_bytes)
    VALUES (NEW.repository_id, 1, NEW.stored_length, NEW.raw_length)
    ON CONFLICT (repository_id) DO UPDATE SET
        record_count = record_count + 1,
        stored_bytes = stored_bytes + excluded.stored_bytes,
        raw_bytes = raw_bytes + excluded.raw_bytes;
END;
CREATE TRIGGER records_usage_delete AFTER DELETE ON records BEGIN
    UPDATE record_usage SET
        record_count = record_count - 1,
        stored_bytes = stored_bytes - OLD.stored_length,
        raw_bytes = raw_bytes - OLD.raw_length
    WHERE repository_id = OLD.repository_id;
END;
"""


class StoredRecord(NamedTuple):
    """A record as stored: decompress with `protocol.decompress_record(codec, data, raw_length)`."""

    codec: int
    raw_length: int
    data: bytes


def present_keys(conn: apsw.Connection, repository_id: int, keys: Iterable[bytes]) -> set[bytes]:
    """The subset of `keys` whose record the repository holds (index-only lookups)."""
    return {
        key
        for (key,) in rows_in(
            conn,
            "SELECT key FROM records WHERE repository_id = ? AND key IN ({marks})",
            (repository_id,),
            list(dict.fromkeys(keys)),
        )
    }


def insert(
    conn: apsw.Connection,
    repository_id: int,
    key: bytes,
    raw_length: int,
    codec: int,
    data: bytes,
    now: float,
) -> bool:
    """Store a verified record unless the repository has it already; True when stored."""
    conn.execute(
        "INSERT INTO records(repository_id, key, raw_length, codec, stored_length, data,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (repository_id, key) DO NOTHING",
        (repository_id, key, raw_length, codec, len(data), data, now),
    )
    return conn.changes() == 1


def insert_many(
    conn: apsw.Connection,
    repository_id: int,
    new: Iterable[tuple[bytes, int, int, bytes | memoryview]],
    now: float,
) -> None:
    """Store verified records `(key, raw_length, codec, data)` that the repository does not
    hold (a key it holds is skipped)."""
    conn.executemany(
        "INSERT INTO records(repository_id, key, raw_length, codec, stored_length, data,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (repository_id, key) DO NOTHING",
        (
            (repository_id, key, raw_length, codec, len(data), data, now)
            for key, raw_length, codec, data in new
        ),
    )


def fetch(
    conn: apsw.Connection, repository_id: int, keys: Iterable[bytes]
) -> dict[bytes, StoredRecord]:
    """The stored records of `keys` that the repository holds (absent keys are left out)."""
    return {
        key: StoredRecord(codec, raw_length, data)
        for key, codec, raw_length, data in rows_in(
            conn,
            "SELECT key, codec, raw_length, data FROM records"
            " WHERE repository_id = ? AND key IN ({marks})",
            (repository_id,),
            list(dict.fromkeys(keys)),
            256,
        )
    }


class Place(NamedTuple):
    """Where a stored record is: read its data with `open_data(conn, rowid)`."""

    rowid: int
    codec: int
    raw_length: int
    stored_length: int


def locate(conn: apsw.Connection, repository_id: int, keys: Iterable[bytes]) -> dict[bytes, Place]:
    """The places of the stored records of `keys` that the repository holds."""
    return {
        key: Place(*place)
        for key, *place in rows_in(
            conn,
            "SELECT key, id, codec, raw_length, stored_length FROM records"
            " WHERE repository_id = ? AND key IN ({marks})",
            (repository_id,),
            list(dict.fromkeys(keys)),
        )
    }


def open_data(conn: apsw.Connection, rowid: int) -> apsw.Blob:
    """The stored bytes of record `rowid`, read-only, for `Blob.read_into` (`reopen` it on
    another record; close it before the transaction ends)."""
    return conn.blob_open("main", "records", "data", rowid, False)


def usage(conn: apsw.Connection, repository_id: int) -> dict[str, int]:
    """Totals of the repository's records: `record_count`, `stored_bytes`, `raw_bytes`."""
    found = conn.execute(
        "SELECT record_count, stored_bytes, raw_bytes FROM record_usage WHERE repository_id = ?",
        (repository_id,),
    ).fetchone()
    count, stored, raw = found if found else (0, 0, 0)
    return {"record_count": count, "stored_bytes": stored, "raw_bytes": raw}


def used_bytes(conn: apsw.Connection, repository_id: int) -> int:
    """Bytes the repository's records take (their stored, compressed size)."""
    return usage(conn, repository_id)["stored_bytes"]


def register_usage() -> None:
    if used_bytes not in repositories.USAGE_SOURCES:
        repositories.USAGE_SOURCES.append(used_bytes)


register_usage()
