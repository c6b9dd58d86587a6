"""This core's own identity: its core id and when the database was created."""

from __future__ import annotations

import uuid

import apsw

SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
"""


def initialise(conn: apsw.Connection, now: float) -> None:
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('core_id', ?), ('created_at', ?)",
        (str(uuid.uuid4()), repr(now)),
    )


def core_id(conn: apsw.Connection) -> str:
    return str(conn.execute("SELECT value FROM meta WHERE key = 'core_id'").fetchone()[0])
