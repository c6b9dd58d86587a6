"""Agents: the protected machines a master core replicates, keyed by (master core, agentId).

Two sources may both have an agent `web01`; they are different rows. An agent is requested
(pending), approved into a repository, or denied.
"""

from __future__ import annotations

from typing import Any

import apsw

from .db import row, rows

SCHEMA = """
CREATE TABLE agents (
    id              INTEGER PRIMARY KEY,
    core_pk         INTEGER NOT NULL REFERENCES master_cores(id) ON DELETE CASCADE,
    agent_id        TEXT NOT NULL,
    display_name    TEXT NOT NULL DEFAULT '',
    host_name       TEXT NOT NULL DEFAULT '',
    repository_type TEXT NOT NULL DEFAULT '',
    state           TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied')),
    repository_id   INTEGER REFERENCES repositories(id),
    paused          INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    UNIQUE (core_pk, agent_id)
) STRICT;
CREATE INDEX agents_repository ON agents(repository_id);
"""


def for_core(conn: apsw.Connection, core_pk: int) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM agents WHERE core_pk = ? ORDER BY agent_id", (core_pk,))


def get(conn: apsw.Connection, core_pk: int, agent_id: str) -> dict[str, Any] | None:
    return row(conn, "SELECT * FROM agents WHERE core_pk = ? AND agent_id = ?", (core_pk, agent_id))
