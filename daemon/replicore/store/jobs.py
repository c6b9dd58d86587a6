"""Mirrored jobs: the target's copy of what a source's replication job is doing.

Owns `jobs` (one row per mirrored job: a source's replication job, a transfer child of one
agent, or a metadata update job of its own), `job_agents` and `job_volume_images` (the
`driverVolumeId:epochNumber` images each agent is to transfer).

A root job (replication or standalone metadata) is keyed by (source core, the source's job
id); a transfer child by (parent, agent). States: running -> succeeded | failed | cancelled.
A running job whose source has not synced it within the timeout is failed by
`expire_jobs()`. Ending a job ends its running children with it, and decides the fate of its
metadata updates: success applies them, failure or cancellation drops them (`store.metadata`).
Starting a replication job fails the running replication jobs that share an agent with it
(the source can only be running one per agent; the older one was lost).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import apsw

from ..errors import Conflict, NotFound, Unprocessable
from . import agents, metadata
from .db import row, rows

SCHEMA = """
CREATE TABLE jobs (
    id                 INTEGER PRIMARY KEY,
    core_pk            INTEGER NOT NULL REFERENCES master_cores(id) ON DELETE CASCADE,
    job_id             TEXT NOT NULL,
    kind               TEXT NOT NULL CHECK (kind IN ('replication', 'transfer', 'metadata')),
    parent_pk          INTEGER REFERENCES jobs(id) ON DELETE CASCADE,
    agent_pk           INTEGER REFERENCES agents(id) ON DELETE CASCADE,
    state              TEXT NOT NULL
                           CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    phase              TEXT NOT NULL DEFAULT '',
    progress           REAL NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    bytes_transferred  INTEGER NOT NULL DEFAULT 0 CHECK (bytes_transferred >= 0),
    bytes_total        INTEGER CHECK (bytes_total IS NULL OR bytes_total >= 0),
    parallel_pipelines INTEGER,
    session_timeout    REAL,
    error              TEXT NOT NULL DEFAULT '',
    started_at         REAL NOT NULL,
    synced_at          REAL NOT NULL,
    finished_at        REAL,
    CHECK ((parent_pk IS NULL) = (kind != 'transfer'))
) STRICT;
CREATE UNIQUE INDEX jobs_root ON jobs(core_pk, job_id) WHERE parent_pk IS NULL;
CREATE UNIQUE INDEX jobs_child ON jobs(parent_pk, agent_pk) WHERE parent_pk IS NOT NULL;
CREATE INDEX jobs_state ON jobs(state, synced_at);
CREATE TABLE job_agents (
    job_pk   INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    agent_pk INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    PRIMARY KEY (job_pk, agent_pk)
) STRICT;
CREATE INDEX job_agents_agent ON job_agents(agent_pk);
CREATE TABLE job_volume_images (
    job_pk           INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    agent_pk         INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    position         INTEGER NOT NULL,
    driver_volume_id TEXT NOT NULL,
    epoch            INTEGER NOT NULL CHECK (epoch BETWEEN 0 AND 4294967295),
    PRIMARY KEY (job_pk, agent_pk, driver_volume_id, epoch)
) STRICT;
"""

STATES = ("running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")

#: The source's job id: a GUID in the original; any token safe in a URL path segment here.
_JOB_ID = re.compile(r"^[A-Za-z0-9{][A-Za-z0-9{}._-]{0,127}$")
_VOLUME_ID = re.compile(r"^[^\s:/\\]{1,128}$")
MAX_AGENTS = 1000
MAX_IMAGES = 100_000


def check_job_id(job_id: str, field: str = "id") -> str:
    if not _JOB_ID.match(job_id):
        raise Unprocessable(
            "a job id is 1-128 of letters, digits, '{', '}', '.', '_', '-'", field=field
        )
    return job_id


def parse_volume_image(token: str, field: str) -> tuple[str, int]:
    """'<driverVolumeId>:<epochNumber>' -> (driverVolumeId, epoch); 422 naming `field`."""
    volume, sep, epoch_text = token.rpartition(":")
    digits = epoch_text.isascii() and epoch_text.isdigit()
    if not sep or not _VOLUME_ID.match(volume) or not digits:
        raise Unprocessable(
            f"{token!r} is not '<driverVolumeId>:<epochNumber>'"
            " (volume id without ':', '/', spaces; epoch a number)",
            field=field,
        )
    epoch = int(epoch_text)
    if epoch > 0xFFFFFFFF:
        raise Unprocessable(f"epoch number of {token!r} is over 4294967295", field=field)
    return volume, epoch


@dataclass
class AgentImages:
    agent_id: str
    images: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Progress:
    """What a sync may change; None leaves the value as it is."""

    state: str | None = None
    phase: str | None = None
    progress: float | None = None
    bytes_transferred: int | None = None
    bytes_total: int | None = None
    error: str | None = None


# --- reading -------------------------------------------------------------------------------


def root(conn: apsw.Connection, core_pk: int, job_id: str) -> dict[str, Any] | None:
    return row(
        conn,
        "SELECT * FROM jobs WHERE core_pk = ? AND job_id = ? AND parent_pk IS NULL",
        (core_pk, job_id),
    )


def _images(conn: apsw.Connection, job_pk: int, agent_pk: int) -> list[str]:
    return [
        f"{r['driver_volume_id']}:{r['epoch']}"
        for r in rows(
            conn,
            "SELECT driver_volume_id, epoch FROM job_volume_images"
            " WHERE job_pk = ? AND agent_pk = ? ORDER BY position",
            (job_pk, agent_pk),
        )
    ]


def _base_view(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": job["kind"],
        "state": job["state"],
        "phase": job["phase"],
        "progress": job["progress"],
        "bytesTransferred": job["bytes_transferred"],
        "bytesTotal": job["bytes_total"],
        "numberParallelPipelines": job["parallel_pipelines"],
        "sessionTimeout": job["session_timeout"],
        "errorDetails": job["error"],
        "startedAt": job["started_at"],
        "lastSyncAt": job["synced_at"],
        "finishedAt": job["finished_at"],
    }


def view(conn: apsw.Connection, job_pk: int) -> dict[str, Any]:
    """A root job as the API shows it (times in epoch seconds; the API formats them): its
    agents with their images, its transfer children and its metadata updates."""
    job = row(conn, "SELECT * FROM jobs WHERE id = ?", (job_pk,))
    assert job is not None
    members = rows(
        conn,
        "SELECT a.id, a.agent_id FROM job_agents ja JOIN agents a ON a.id = ja.agent_pk"
        " WHERE ja.job_pk = ? ORDER BY a.agent_id",
        (job_pk,),
    )
    children = rows(
        conn,
        "SELECT j.*, a.agent_id FROM jobs j JOIN agents a ON a.id = j.agent_pk"
        " WHERE j.parent_pk = ? ORDER BY a.agent_id",
        (job_pk,),
    )
    return {
        "id": job["job_id"],
        **_base_view(job),
        "agents": [
            {"id": m["agent_id"], "volumeImagesToTransfer": _images(conn, job_pk, m["id"])}
            for m in members
        ],
        "transferJobs": [
            {
                "agentId": c["agent_id"],
                **_base_view(c),
                "volumeImagesToTransfer": _images(conn, c["id"], c["agent_pk"]),
            }
            for c in children
        ],
        "metadataUpdates": [
            {
                "agentId": u["agent_id"],
                "state": u["state"],
                "startedAt": u["started_at"],
                "finishedAt": u["finished_at"],
            }
            for u in metadata.for_job(conn, job_pk)
        ],
    }


def current_for_agent(conn: apsw.Connection, agent_pk: int) -> dict[str, Any] | None:
    """The running replication job that includes the agent (the newest, if several)."""
    return row(
        conn,
        "SELECT j.* FROM jobs j JOIN job_agents ja ON ja.job_pk = j.id"
        " WHERE ja.agent_pk = ? AND j.kind = 'replication' AND j.state = 'running'"
        " ORDER BY j.started_at DESC, j.id DESC LIMIT 1",
        (agent_pk,),
    )


def list_jobs(
    conn: apsw.Connection, now: float, *, everything: bool = False, recent: float = 86400.0
) -> list[dict[str, Any]]:
    """Root jobs for the operator, newest first: running ones and those finished within
    `recent` seconds (all with `everything`). Each has `source` (core id, host name) and the
    API view."""
    where = "" if everything else "AND (j.state = 'running' OR j.finished_at >= ?)"
    found = rows(
        conn,
        "SELECT j.id, c.core_id, c.host_name, c.customer_id FROM jobs j"
        f" JOIN master_cores c ON c.id = j.core_pk WHERE j.parent_pk IS NULL {where}"
        " ORDER BY j.started_at DESC, j.id DESC",
        () if everything else (now - recent,),
    )
    return [
        {
            "source": {"coreId": r["core_id"], "hostName": r["host_name"]},
            **view(conn, r["id"]),
        }
        for r in found
    ]


# --- writing -------------------------------------------------------------------------------


def _approved_agent(conn: apsw.Connection, core_pk: int, agent_id: str, field: str) -> int:
    """The row id of the caller's approved agent; 404 for anything else (another source's
    agents are simply not found)."""
    agent = agents.get(conn, core_pk, agent_id)
    if agent is None or agent["state"] != "approved":
        raise NotFound(f"no approved agent {agent_id!r} replicates from this core", field=field)
    return int(agent["id"])


def _insert_images(
    conn: apsw.Connection, job_pk: int, agent_pk: int, images: list[tuple[str, int]]
) -> None:
    for position, (volume, epoch) in enumerate(images):
        conn.execute(
            "INSERT INTO job_volume_images(job_pk, agent_pk, position, driver_volume_id, epoch)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (job_pk, agent_pk, position, volume, epoch),
        )


def _finish(conn: apsw.Connection, job_pk: int, state: str, error: str, now: float) -> None:
    """End a job and its running children; apply or drop its running metadata updates."""
    assert state in TERMINAL
    progress = ", progress = 100" if state == "succeeded" else ""
    conn.execute(
        f"UPDATE jobs SET state = ?, error = ?, finished_at = ?{progress}"
        " WHERE (id = ? OR parent_pk = ?) AND state = 'running'",
        (state, error, now, job_pk, job_pk),
    )
    if state == "succeeded":
        metadata.apply_running(conn, job_pk, now)
    else:
        metadata.end_running(conn, job_pk, state, error or f"the job {state}", now)


def start_replication(
    conn: apsw.Connection,
    core_pk: int,
    job_id: str,
    members: list[AgentImages],
    parallel_pipelines: int | None,
    session_timeout: float | None,
    now: float,
) -> tuple[int, bool]:
    """Create the mirror of a source's replication job; returns (job row id, created).

    Starting a job that is already running (a retried call) returns it unchanged but for its
    sync time; a job id that already ended is a conflict. Every agent must be an approved
    agent of the caller."""
    check_job_id(job_id)
    if not members:
        raise Unprocessable("a replication job needs at least one agent", field="agents")
    if len(members) > MAX_AGENTS:
        raise Unprocessable(f"at most {MAX_AGENTS} agents per job", field="agents")
    if sum(len(m.images) for m in members) > MAX_IMAGES:
        raise Unprocessable(f"at most {MAX_IMAGES} volume images per job", field="agents")
    resolved: list[tuple[int, AgentImages]] = []
    seen: set[str] = set()
    for i, member in enumerate(members):
        if member.agent_id in seen:
            raise Unprocessable(f"agent {member.agent_id!r} is listed twice", field=f"agents[{i}]")
        seen.add(member.agent_id)
        resolved.append(
            (_approved_agent(conn, core_pk, member.agent_id, f"agents[{i}].id"), member)
        )
    existing = root(conn, core_pk, job_id)
    if existing is not None:
        if existing["kind"] != "replication" or existing["state"] != "running":
            raise Conflict(
                f"job {job_id!r} already exists and is {existing['state']}",
                field="id",
                state=existing["state"],
            )
        conn.execute("UPDATE jobs SET synced_at = ? WHERE id = ?", (now, existing["id"]))
        return int(existing["id"]), False
    placeholders = ",".join("?" * len(resolved))
    superseded = rows(
        conn,
        "SELECT DISTINCT j.id FROM jobs j JOIN job_agents ja ON ja.job_pk = j.id"
        " WHERE j.kind = 'replication' AND j.state = 'running'"
        f" AND ja.agent_pk IN ({placeholders})",
        [agent_pk for agent_pk, _ in resolved],
    )
    for old in superseded:
        _finish(conn, old["id"], "failed", f"superseded by job {job_id}", now)
    conn.execute(
        "INSERT INTO jobs(core_pk, job_id, kind, state, phase, parallel_pipelines,"
        " session_timeout, started_at, synced_at) VALUES (?, ?, 'replication', 'running',"
        " 'started', ?, ?, ?, ?)",
        (core_pk, job_id, parallel_pipelines, session_timeout, now, now),
    )
    job_pk = conn.last_insert_rowid()
    for agent_pk, member in resolved:
        conn.execute("INSERT INTO job_agents(job_pk, agent_pk) VALUES (?, ?)", (job_pk, agent_pk))
        _insert_images(conn, job_pk, agent_pk, member.images)
    return job_pk, True


def _check_progress(update: Progress, field_prefix: str) -> None:
    if update.state is not None and update.state not in STATES:
        raise Unprocessable(
            f"state must be one of {', '.join(STATES)}", field=f"{field_prefix}state"
        )


def _apply_progress(conn: apsw.Connection, job_pk: int, update: Progress, now: float) -> None:
    sets, args = ["synced_at = ?"], [now]
    for column, value in (
        ("phase", update.phase),
        ("progress", update.progress),
        ("bytes_transferred", update.bytes_transferred),
        ("bytes_total", update.bytes_total),
        ("error", update.error),
    ):
        if value is not None:
            sets.append(f"{column} = ?")
            args.append(value)
    conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_pk))


def sync(
    conn: apsw.Connection,
    core_pk: int,
    job_id: str,
    update: Progress,
    transfers: dict[str, Progress],
    now: float,
) -> int:
    """Record a source's progress report for its job (and for transfer children by agent id);
    a terminal state ends the job (see `_finish`). Leaving the 'metadata' phase applies the
    job's running metadata updates. A job that already ended is a conflict naming its state,
    so a source learns that the target failed it. Returns the job's row id."""
    _check_progress(update, "")
    job = root(conn, core_pk, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r} of this source", field="id")
    if job["state"] != "running":
        raise Conflict(
            f"job {job_id!r} is already {job['state']}"
            + (f": {job['error']}" if job["error"] else ""),
            field="id",
            state=job["state"],
        )
    children = {}
    for i, (agent_id, child_update) in enumerate(transfers.items()):
        _check_progress(child_update, f"transfers[{i}].")
        child = row(
            conn,
            "SELECT j.* FROM jobs j JOIN agents a ON a.id = j.agent_pk"
            " WHERE j.parent_pk = ? AND a.agent_id = ?",
            (job["id"], agent_id),
        )
        if child is None:
            raise NotFound(
                f"job {job_id!r} has no transfer job for agent {agent_id!r}",
                field=f"transfers[{i}].agentId",
            )
        children[child["id"]] = child_update
    for child_pk, child_update in children.items():
        _apply_progress(conn, child_pk, child_update, now)
        if child_update.state in TERMINAL:
            conn.execute(
                "UPDATE jobs SET state = ?, finished_at = ? WHERE id = ? AND state = 'running'",
                (child_update.state, now, child_pk),
            )
    _apply_progress(conn, job["id"], update, now)
    if update.phase is not None and update.phase != "metadata":
        metadata.apply_running(conn, job["id"], now)
    if update.state in TERMINAL:
        _finish(conn, job["id"], update.state, update.error or "", now)
    return int(job["id"])


def start_transfer(
    conn: apsw.Connection,
    core_pk: int,
    agent_id: str,
    job_id: str,
    images: list[tuple[str, int]] | None,
    parallel_pipelines: int | None,
    session_timeout: float | None,
    now: float,
) -> tuple[int, bool]:
    """Create the transfer child of replication job `job_id` for one of its agents; returns
    (the parent's row id, created). The images default to those the job listed for the
    agent. Starting the transfer ends the agent's metadata phase: its running metadata update
    in this job is applied. A second call for the same agent returns the existing child."""
    agent_pk = _approved_agent(conn, core_pk, agent_id, "agentId")
    job = root(conn, core_pk, job_id)
    if job is None or job["kind"] != "replication":
        raise NotFound(f"no replication job {job_id!r} of this source", field="jobId")
    if not row(
        conn,
        "SELECT 1 AS x FROM job_agents WHERE job_pk = ? AND agent_pk = ?",
        (job["id"], agent_pk),
    ):
        raise NotFound(f"job {job_id!r} does not include agent {agent_id!r}", field="agentId")
    if job["state"] != "running":
        raise Conflict(f"job {job_id!r} is already {job['state']}", state=job["state"])
    existing = row(
        conn, "SELECT id FROM jobs WHERE parent_pk = ? AND agent_pk = ?", (job["id"], agent_pk)
    )
    if existing is not None:
        return int(job["id"]), False
    if images is not None and len(images) > MAX_IMAGES:
        raise Unprocessable(f"at most {MAX_IMAGES} volume images", field="volumeImagesToTransfer")
    conn.execute(
        "INSERT INTO jobs(core_pk, job_id, kind, parent_pk, agent_pk, state, phase,"
        " parallel_pipelines, session_timeout, started_at, synced_at)"
        " VALUES (?, ?, 'transfer', ?, ?, 'running', 'transfer', ?, ?, ?, ?)",
        (
            core_pk,
            job_id,
            job["id"],
            agent_pk,
            parallel_pipelines if parallel_pipelines is not None else job["parallel_pipelines"],
            session_timeout if session_timeout is not None else job["session_timeout"],
            now,
            now,
        ),
    )
    child_pk = conn.last_insert_rowid()
    if images is None:
        conn.execute(
            "INSERT INTO job_volume_images(job_pk, agent_pk, position, driver_volume_id, epoch)"
            " SELECT ?, agent_pk, position, driver_volume_id, epoch FROM job_volume_images"
            " WHERE job_pk = ? AND agent_pk = ?",
            (child_pk, job["id"], agent_pk),
        )
    else:
        _insert_images(conn, child_pk, agent_pk, images)
    conn.execute("UPDATE jobs SET synced_at = ? WHERE id = ?", (now, job["id"]))
    metadata.apply_running(conn, job["id"], now, agent_pk=agent_pk)
    return int(job["id"]), True


def start_metadata_update(
    conn: apsw.Connection, core_pk: int, agent_id: str, document: dict[str, Any], now: float
) -> int:
    """Begin a metadata update of the agent as a phase of its current replication job (which
    moves to phase 'metadata'); 409 when the agent has no running replication job. Returns
    the update's id."""
    agent_pk = _approved_agent(conn, core_pk, agent_id, "agentId")
    job = current_for_agent(conn, agent_pk)
    if job is None:
        raise Conflict(
            "this agent has no running replication job; start one, or use metadataUpdateJob",
            field="agentId",
        )
    update_pk = metadata.begin(conn, agent_pk, job["id"], document, now, standalone=False)
    conn.execute("UPDATE jobs SET phase = 'metadata', synced_at = ? WHERE id = ?", (now, job["id"]))
    return update_pk


def start_metadata_job(
    conn: apsw.Connection,
    core_pk: int,
    agent_id: str,
    job_id: str,
    document: dict[str, Any],
    now: float,
) -> tuple[int, bool]:
    """Begin a metadata update of the agent as a job of its own (kind 'metadata', id
    `job_id`); the source ends it with a sync (success applies the update). Returns (job row
    id, created); a retried call with the same job id replaces the pending document."""
    check_job_id(job_id, "jobId")
    agent_pk = _approved_agent(conn, core_pk, agent_id, "agentId")
    existing = root(conn, core_pk, job_id)
    if existing is not None:
        member = row(
            conn,
            "SELECT 1 AS x FROM job_agents WHERE job_pk = ? AND agent_pk = ?",
            (existing["id"], agent_pk),
        )
        if existing["kind"] != "metadata" or existing["state"] != "running" or member is None:
            raise Conflict(
                f"job {job_id!r} already exists ({existing['kind']}, {existing['state']})",
                field="jobId",
                state=existing["state"],
            )
        metadata.begin(conn, agent_pk, existing["id"], document, now, standalone=True)
        conn.execute("UPDATE jobs SET synced_at = ? WHERE id = ?", (now, existing["id"]))
        return int(existing["id"]), False
    conn.execute(
        "INSERT INTO jobs(core_pk, job_id, kind, state, phase, started_at, synced_at)"
        " VALUES (?, ?, 'metadata', 'running', 'metadata', ?, ?)",
        (core_pk, job_id, now, now),
    )
    job_pk = conn.last_insert_rowid()
    conn.execute("INSERT INTO job_agents(job_pk, agent_pk) VALUES (?, ?)", (job_pk, agent_pk))
    metadata.begin(conn, agent_pk, job_pk, document, now, standalone=True)
    return job_pk, True


def cancel_metadata_update(
    conn: apsw.Connection, core_pk: int, agent_id: str, now: float
) -> dict[str, Any]:
    """Cancel the agent's running metadata update (DELETE metadataUpdate); a standalone
    metadata job is cancelled with it. Returns the update row (with `job_id`)."""
    agent_pk = _approved_agent(conn, core_pk, agent_id, "agentId")
    update = metadata.cancel(conn, agent_pk, now)
    if update["standalone"]:
        conn.execute(
            "UPDATE jobs SET state = 'cancelled', error = 'cancelled by the source',"
            " finished_at = ? WHERE id = ? AND state = 'running'",
            (now, update["job_pk"]),
        )
    else:
        conn.execute(
            "UPDATE jobs SET synced_at = ? WHERE id = ? AND state = 'running'",
            (now, update["job_pk"]),
        )
    return update


def metadata_status(conn: apsw.Connection, core_pk: int, agent_id: str) -> dict[str, Any]:
    """The agent's latest metadata update (404 if it never had one)."""
    agent_pk = _approved_agent(conn, core_pk, agent_id, "agentId")
    update = metadata.latest(conn, agent_pk)
    if update is None:
        raise NotFound("this agent has no metadata update", field="agentId")
    update["document"] = json.loads(update["document"])
    return update


def expire_jobs(conn: apsw.Connection, now: float, timeout: float) -> list[int]:
    """Fail every running root job not synced for `timeout` seconds (children and metadata
    updates go with it); returns their row ids."""
    stale = rows(
        conn,
        "SELECT id FROM jobs WHERE state = 'running' AND parent_pk IS NULL AND synced_at < ?",
        (now - timeout,),
    )
    for job in stale:
        _finish(conn, job["id"], "failed", f"not synced by its source for {timeout:g} s", now)
    return [int(j["id"]) for j in stale]
