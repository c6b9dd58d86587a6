"""Agent metadata: the description a source sends of each replicated agent, and its updates.

Owns `agent_metadata` (the applied description: names, operating system), `agent_volumes`,
`agent_applications` and `metadata_updates` (each update a source started: its pending
document, its state running -> completed | cancelled | failed, and its times).

An update stores the incoming document as pending; only `apply_running()` makes it the
agent's metadata, in the caller's transaction, replacing the previous description whole (and
refreshing `agents.display_name` / `host_name`). A cancelled or failed update never touches
the applied metadata. Which event applies an update is decided by `store.jobs`.

A document is the camelCase dict the API receives and shows:
`{"displayName", "hostName", "operatingSystem": {"name", "version", "architecture"} | None,
"volumes": [{"id", "label", "size", "fileSystem"}], "applications": [{"type", "name",
"version"}]}`.
"""

from __future__ import annotations

import json
from typing import Any

import apsw

from ..errors import Conflict, NotFound
from .db import row, rows

SCHEMA = """
CREATE TABLE agent_metadata (
    agent_pk        INTEGER PRIMARY KEY REFERENCES agents(id) ON DELETE CASCADE,
    display_name    TEXT NOT NULL,
    host_name       TEXT NOT NULL,
    os_name         TEXT,
    os_version      TEXT NOT NULL DEFAULT '',
    os_architecture TEXT NOT NULL DEFAULT '',
    update_pk       INTEGER NOT NULL,
    updated_at      REAL NOT NULL
) STRICT;
CREATE TABLE agent_volumes (
    agent_pk    INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    volume_id   TEXT NOT NULL,
    label       TEXT NOT NULL,
    size        INTEGER NOT NULL CHECK (size >= 0),
    file_system TEXT NOT NULL,
    PRIMARY KEY (agent_pk, volume_id)
) STRICT;
CREATE TABLE agent_applications (
    agent_pk INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    type     TEXT NOT NULL CHECK (type IN ('exchange', 'sqlServer')),
    name     TEXT NOT NULL,
    version  TEXT NOT NULL,
    PRIMARY KEY (agent_pk, position)
) STRICT;
CREATE TABLE metadata_updates (
    id          INTEGER PRIMARY KEY,
    agent_pk    INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    job_pk      INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    standalone  INTEGER NOT NULL CHECK (standalone IN (0, 1)),
    state       TEXT NOT NULL CHECK (state IN ('running', 'completed', 'cancelled', 'failed')),
    document    TEXT NOT NULL,
    error       TEXT NOT NULL DEFAULT '',
    started_at  REAL NOT NULL,
    finished_at REAL
) STRICT;
CREATE INDEX metadata_updates_agent ON metadata_updates(agent_pk, id);
CREATE INDEX metadata_updates_job ON metadata_updates(job_pk);
CREATE UNIQUE INDEX metadata_updates_one_running ON metadata_updates(agent_pk)
    WHERE state = 'running';
"""

TERMINAL = ("completed", "cancelled", "failed")


def get(conn: apsw.Connection, agent_pk: int) -> dict[str, Any] | None:
    """The agent's applied metadata document (see the module docstring) plus `updatedAt`
    (epoch seconds) and `jobId` of the update that set it; None if none was ever applied."""
    found = row(
        conn,
        "SELECT m.*, j.job_id FROM agent_metadata m"
        " LEFT JOIN metadata_updates u ON u.id = m.update_pk"
        " LEFT JOIN jobs j ON j.id = u.job_pk WHERE m.agent_pk = ?",
        (agent_pk,),
    )
    if found is None:
        return None
    volumes = rows(
        conn,
        "SELECT volume_id, label, size, file_system FROM agent_volumes"
        " WHERE agent_pk = ? ORDER BY position",
        (agent_pk,),
    )
    applications = rows(
        conn,
        "SELECT type, name, version FROM agent_applications WHERE agent_pk = ? ORDER BY position",
        (agent_pk,),
    )
    operating_system = None
    if found["os_name"] is not None:
        operating_system = {
            "name": found["os_name"],
            "version": found["os_version"],
            "architecture": found["os_architecture"],
        }
    return {
        "displayName": found["display_name"],
        "hostName": found["host_name"],
        "operatingSystem": operating_system,
        "volumes": [
            {
                "id": v["volume_id"],
                "label": v["label"],
                "size": v["size"],
                "fileSystem": v["file_system"],
            }
            for v in volumes
        ],
        "applications": applications,
        "updatedAt": found["updated_at"],
        "jobId": found["job_id"],
    }


def running(conn: apsw.Connection, agent_pk: int) -> dict[str, Any] | None:
    return row(
        conn,
        "SELECT * FROM metadata_updates WHERE agent_pk = ? AND state = 'running'",
        (agent_pk,),
    )


def latest(conn: apsw.Connection, agent_pk: int) -> dict[str, Any] | None:
    """The agent's most recent update (any state), with the source's `job_id`."""
    return row(
        conn,
        "SELECT u.*, j.job_id FROM metadata_updates u JOIN jobs j ON j.id = u.job_pk"
        " WHERE u.agent_pk = ? ORDER BY u.id DESC LIMIT 1",
        (agent_pk,),
    )


def begin(
    conn: apsw.Connection,
    agent_pk: int,
    job_pk: int,
    document: dict[str, Any],
    now: float,
    *,
    standalone: bool,
) -> int:
    """Store `document` as the pending metadata of a running update of the agent within job
    `job_pk`. A running update of the same job takes the new document (a retried POST); one
    of another job is a conflict. Returns the update's id."""
    current = running(conn, agent_pk)
    encoded = json.dumps(document, sort_keys=True)
    if current is not None:
        if current["job_pk"] != job_pk:
            raise Conflict(
                "another metadata update of this agent is running (in another job)",
                field="agentId",
            )
        conn.execute(
            "UPDATE metadata_updates SET document = ? WHERE id = ?", (encoded, current["id"])
        )
        return int(current["id"])
    conn.execute(
        "INSERT INTO metadata_updates(agent_pk, job_pk, standalone, state, document, started_at)"
        " VALUES (?, ?, ?, 'running', ?, ?)",
        (agent_pk, job_pk, int(standalone), encoded, now),
    )
    return conn.last_insert_rowid()


def _apply(conn: apsw.Connection, update: dict[str, Any], now: float) -> None:
    agent_pk = update["agent_pk"]
    doc = json.loads(update["document"])
    operating_system = doc.get("operatingSystem") or {}
    conn.execute(
        "INSERT INTO agent_metadata(agent_pk, display_name, host_name, os_name, os_version,"
        " os_architecture, update_pk, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (agent_pk) DO UPDATE SET display_name = excluded.display_name,"
        " host_name = excluded.host_name, os_name = excluded.os_name,"
        " os_version = excluded.os_version, os_architecture = excluded.os_architecture,"
        " update_pk = excluded.update_pk, updated_at = excluded.updated_at",
        (
            agent_pk,
            doc["displayName"],
            doc["hostName"],
            operating_system.get("name"),
            operating_system.get("version", ""),
            operating_system.get("architecture", ""),
            update["id"],
            now,
        ),
    )
    conn.execute("DELETE FROM agent_volumes WHERE agent_pk = ?", (agent_pk,))
    for position, volume in enumerate(doc.get("volumes", [])):
        conn.execute(
            "INSERT INTO agent_volumes(agent_pk, position, volume_id, label, size, file_system)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                agent_pk,
                position,
                volume["id"],
                volume["label"],
                volume["size"],
                volume["fileSystem"],
            ),
        )
    conn.execute("DELETE FROM agent_applications WHERE agent_pk = ?", (agent_pk,))
    for position, application in enumerate(doc.get("applications", [])):
        conn.execute(
            "INSERT INTO agent_applications(agent_pk, position, type, name, version)"
            " VALUES (?, ?, ?, ?, ?)",
            (agent_pk, position, application["type"], application["name"], application["version"]),
        )
    conn.execute(
        "UPDATE agents SET display_name = ?, host_name = ? WHERE id = ?",
        (doc["displayName"], doc["hostName"], agent_pk),
    )
    conn.execute(
        "UPDATE metadata_updates SET state = 'completed', finished_at = ? WHERE id = ?",
        (now, update["id"]),
    )


def apply_running(
    conn: apsw.Connection, job_pk: int, now: float, agent_pk: int | None = None
) -> int:
    """Apply the running updates of job `job_pk` (only agent `agent_pk`'s when given), each
    replacing that agent's metadata; returns how many were applied."""
    sql = "SELECT * FROM metadata_updates WHERE job_pk = ? AND state = 'running'"
    args: tuple[Any, ...] = (job_pk,)
    if agent_pk is not None:
        sql += " AND agent_pk = ?"
        args = (job_pk, agent_pk)
    found = rows(conn, sql, args)
    for update in found:
        _apply(conn, update, now)
    return len(found)


def end_running(conn: apsw.Connection, job_pk: int, state: str, error: str, now: float) -> None:
    """End the running updates of a job without applying them (state cancelled or failed)."""
    assert state in ("cancelled", "failed")
    conn.execute(
        "UPDATE metadata_updates SET state = ?, error = ?, finished_at = ?"
        " WHERE job_pk = ? AND state = 'running'",
        (state, error, now, job_pk),
    )


def cancel(conn: apsw.Connection, agent_pk: int, now: float) -> dict[str, Any]:
    """Cancel the agent's running update (its metadata stays as it was); returns the update.
    An update already cancelled is answered as it is; one that completed or failed is a
    conflict; an agent without any update is 404."""
    update = latest(conn, agent_pk)
    if update is None:
        raise NotFound("this agent has no metadata update", field="agentId")
    if update["state"] == "running":
        conn.execute(
            "UPDATE metadata_updates SET state = 'cancelled', error = 'cancelled by the source',"
            " finished_at = ? WHERE id = ?",
            (now, update["id"]),
        )
        update = latest(conn, agent_pk)
        assert update is not None
    elif update["state"] != "cancelled":
        raise Conflict(
            f"the latest metadata update of this agent is already {update['state']}",
            state=update["state"],
        )
    return update


def for_job(conn: apsw.Connection, job_pk: int) -> list[dict[str, Any]]:
    return rows(
        conn,
        "SELECT u.*, a.agent_id FROM metadata_updates u JOIN agents a ON a.id = u.agent_pk"
        " WHERE u.job_pk = ? ORDER BY a.agent_id",
        (job_pk,),
    )
