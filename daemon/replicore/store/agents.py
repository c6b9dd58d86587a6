"""Agents: the protected machines a master core replicates, keyed by (master core, agentId).

Two sources may both have an agent `web01`; they are different rows. An agent is requested
(pending), approved into a repository, or denied. An approved agent always has a repository;
an agent that was never approved never has data, so only such rows are ever deleted here.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import apsw

from ..errors import Unprocessable
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

#: An agent id: a GUID in the original; any token safe in a URL path segment here, except
#: the words of literal routes under slave/agents/ (those routes win over agents/{agentId}).
AGENT_ID_PATTERN = r"^(?!(?:request|demand|replicationJob)$)[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_AGENT_ID = re.compile(AGENT_ID_PATTERN)


def check_agent_id(agent_id: str, field: str = "agentId") -> str:
    if not _AGENT_ID.match(agent_id):
        raise Unprocessable(
            "an agent id is 1-128 of letters, digits, '.', '_', ':', '-' "
            "starting with a letter or digit, and not request, demand or replicationJob",
            field=field,
        )
    return agent_id


@dataclass(frozen=True)
class AgentRequest:
    """One agent a source asks for (`agentInfo`), with the repository wanted for it, if any."""

    agent_id: str
    display_name: str = ""
    host_name: str = ""
    repository_type: str = ""
    repository: str | None = None


def for_core(conn: apsw.Connection, core_pk: int) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM agents WHERE core_pk = ? ORDER BY agent_id", (core_pk,))


def get(conn: apsw.Connection, core_pk: int, agent_id: str) -> dict[str, Any] | None:
    return row(conn, "SELECT * FROM agents WHERE core_pk = ? AND agent_id = ?", (core_pk, agent_id))


def with_repositories(conn: apsw.Connection, core_pk: int) -> list[dict[str, Any]]:
    """The core's agents, each with `repository_name` (None when it has no repository)."""
    return rows(
        conn,
        "SELECT a.*, r.name AS repository_name FROM agents a "
        "LEFT JOIN repositories r ON r.id = a.repository_id "
        "WHERE a.core_pk = ? ORDER BY a.agent_id",
        (core_pk,),
    )


def request(conn: apsw.Connection, core_pk: int, wanted: list[AgentRequest]) -> None:
    """Record the agents a source asks for: new ones and denied ones become pending, approved
    ones stay approved (their names are refreshed)."""
    now = time.time()
    for agent in wanted:
        conn.execute(
            "INSERT INTO agents(core_pk, agent_id, display_name, host_name, repository_type,"
            " state, created_at) VALUES (?, ?, ?, ?, ?, 'pending', ?)"
            " ON CONFLICT (core_pk, agent_id) DO UPDATE SET"
            " display_name = excluded.display_name, host_name = excluded.host_name,"
            " repository_type = excluded.repository_type,"
            " state = CASE WHEN state = 'approved' THEN 'approved' ELSE 'pending' END",
            (
                core_pk,
                agent.agent_id,
                agent.display_name,
                agent.host_name,
                agent.repository_type,
                now,
            ),
        )


def approve_pending(
    conn: apsw.Connection,
    core_pk: int,
    default_repository: int,
    per_agent: dict[str, int],
    field: str = "agentRepository",
) -> None:
    """Approve every pending agent of the core into the repository `per_agent` names for it,
    else the default. Agents approved before keep their repository."""
    pending = {
        r["agent_id"]
        for r in rows(
            conn, "SELECT agent_id FROM agents WHERE core_pk = ? AND state = 'pending'", (core_pk,)
        )
    }
    unknown = sorted(set(per_agent) - pending)
    if unknown:
        raise Unprocessable(
            f"agent {unknown[0]!r} is not a pending agent of this request", field=field
        )
    for agent_id in sorted(pending):
        conn.execute(
            "UPDATE agents SET state = 'approved', repository_id = ?"
            " WHERE core_pk = ? AND agent_id = ?",
            (per_agent.get(agent_id, default_repository), core_pk, agent_id),
        )


def deny_pending(conn: apsw.Connection, core_pk: int) -> None:
    conn.execute(
        "UPDATE agents SET state = 'denied' WHERE core_pk = ? AND state = 'pending'", (core_pk,)
    )


def drop_unapproved(conn: apsw.Connection, core_pk: int) -> None:
    """Delete the core's agents that were never approved (they hold no data)."""
    conn.execute(
        "DELETE FROM agents WHERE core_pk = ? AND state != 'approved' AND repository_id IS NULL",
        (core_pk,),
    )


def has_data_rows(conn: apsw.Connection, core_pk: int) -> bool:
    """True when some agent of the core was ever given a repository (it may hold data)."""
    found = row(
        conn,
        "SELECT 1 AS x FROM agents WHERE core_pk = ? AND repository_id IS NOT NULL LIMIT 1",
        (core_pk,),
    )
    return found is not None


def describe(agent: dict[str, Any], core_paused: bool = False) -> dict[str, Any]:
    """An agent as the API shows it to its own source (`agentInfo` plus its pairing state)."""
    approved = agent["state"] == "approved"
    return {
        "agentInfo": {
            "id": agent["agent_id"],
            "displayName": agent["display_name"],
            "hostName": agent["host_name"],
            "repositoryType": agent["repository_type"],
        },
        "state": agent["state"],
        "repositoryId": agent["repository_id"] if approved else None,
        "repositoryName": agent.get("repository_name") if approved else None,
        "isReplicationPaused": bool(agent["paused"]) or core_paused,
    }


def repositories_of(conn: apsw.Connection, core_pk: int) -> list[dict[str, Any]]:
    """The repositories a core may use: those of its approved agents and its own default one,
    each with `agents` (the ids of the core's approved agents in it) and `is_default`."""
    found = rows(
        conn,
        "SELECT r.*, (r.id = c.repository_id) AS is_default FROM repositories r"
        " JOIN master_cores c ON c.id = ?"
        " WHERE r.id = c.repository_id OR r.id IN"
        " (SELECT repository_id FROM agents WHERE core_pk = ? AND state = 'approved')"
        " ORDER BY r.name",
        (core_pk, core_pk),
    )
    for repo in found:
        repo["is_default"] = bool(repo["is_default"])
        repo["agents"] = [
            r["agent_id"]
            for r in rows(
                conn,
                "SELECT agent_id FROM agents WHERE core_pk = ? AND repository_id = ?"
                " AND state = 'approved' ORDER BY agent_id",
                (core_pk, repo["id"]),
            )
        ]
    return found
