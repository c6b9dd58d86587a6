"""What a source (and the operator) can see of its agents and their recovery points, and the
agent-level state this area adds.

Owns `agent_status` (the replication status a source reports for its agent: its own pause,
last job and progress) and `agent_request_repositories` (the repository a source asked for
when it added an agent by request, used when the operator approves it).

Reads the tables of others: `agents` (store/agents.py), `recovery_points`, `volume_images`,
`image_blocks` (store/images.py), `records` (store/records.py), `sessions`
(store/sessions.py). Every function that serves a source takes the caller's core row id and
never looks at another core's agents. Recovery points are listed complete ones only, newest
first by timestamp, ties by row id: a stable order for paging. Whatever is in the recycle
bin is not in these tables at all (store/recycle_bin.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import apsw

from ..errors import Conflict, NotFound, Unprocessable
from . import agents, repositories, retention
from .db import row, rows

SCHEMA = """
CREATE TABLE agent_status (
    agent_pk       INTEGER PRIMARY KEY REFERENCES agents(id) ON DELETE CASCADE,
    paused         INTEGER NOT NULL DEFAULT 0,
    last_job_id    TEXT NOT NULL DEFAULT '',
    last_job_state TEXT NOT NULL DEFAULT '',
    progress       REAL,
    message        TEXT NOT NULL DEFAULT '',
    updated_at     REAL NOT NULL
) STRICT;
CREATE TABLE agent_request_repositories (
    agent_pk      INTEGER PRIMARY KEY REFERENCES agents(id) ON DELETE CASCADE,
    repository_id INTEGER NOT NULL REFERENCES repositories(id),
    requested_at  REAL NOT NULL
) STRICT;
"""

#: Words of literal routes under `slave/agents/`: never agent ids (the routes win).
RESERVED_AGENT_IDS = frozenset({"request", "demand", "replicationJob"})
#: Job states a source may report (case-insensitive on the wire).
JOB_STATES = ("none", "queued", "running", "succeeded", "failed", "cancelled")
#: Largest page of `skipCount/{n}/maxCount/{m}/rps`, and the largest skip.
MAX_PAGE = 1000
MAX_SKIP = 2**31 - 1

_ORDER = "ORDER BY unixepoch(rp.timestamp, 'subsec') DESC, rp.id DESC"


def check_new_agent_id(agent_id: str, field: str = "agentId") -> str:
    """An agent id a source may add: the usual pattern, and not a reserved route word."""
    agents.check_agent_id(agent_id, field)
    if agent_id in RESERVED_AGENT_IDS:
        raise Unprocessable(
            f"{agent_id!r} is reserved (a route under slave/agents/); choose another agent id",
            field=field,
        )
    return agent_id


# --------------------------------------------------------------------------
# Agents
# --------------------------------------------------------------------------


def agent_rows(conn: apsw.Connection, core_pk: int) -> list[dict[str, Any]]:
    """The core's agents with their repository name, status and recovery point totals."""
    return rows(
        conn,
        "SELECT a.*, r.name AS repository_name,"
        " s.paused AS source_paused, s.last_job_id, s.last_job_state, s.progress,"
        " s.message AS status_message, s.updated_at AS status_updated_at,"
        " (SELECT count(*) FROM recovery_points p WHERE p.agent_pk = a.id AND p.complete = 1)"
        "   AS recovery_point_count,"
        " (SELECT p.timestamp FROM recovery_points p WHERE p.agent_pk = a.id AND p.complete = 1"
        "   ORDER BY unixepoch(p.timestamp, 'subsec') DESC, p.id DESC LIMIT 1) AS newest,"
        " (SELECT p.timestamp FROM recovery_points p WHERE p.agent_pk = a.id AND p.complete = 1"
        "   ORDER BY unixepoch(p.timestamp, 'subsec'), p.id LIMIT 1) AS oldest"
        " FROM agents a LEFT JOIN repositories r ON r.id = a.repository_id"
        " LEFT JOIN agent_status s ON s.agent_pk = a.id"
        " WHERE a.core_pk = ? ORDER BY a.agent_id",
        (core_pk,),
    )


def agent_row(conn: apsw.Connection, core_pk: int, agent_id: str) -> dict[str, Any] | None:
    for found in agent_rows(conn, core_pk):
        if found["agent_id"] == agent_id:
            return found
    return None


def is_replicating(agent: dict[str, Any], core: dict[str, Any]) -> bool:
    """Approved into a repository and paused by nobody."""
    return (
        agent["state"] == "approved"
        and agent["repository_id"] is not None
        and not agent["paused"]
        and not core["paused"]
        and not agent.get("source_paused")
    )


def describe_agent(agent: dict[str, Any], core: dict[str, Any]) -> dict[str, Any]:
    """An agent as its own source sees it (CONTRACTS: replicated agent), without free space
    (the API adds `freeSpace`)."""
    by_operator = bool(agent["paused"]) or bool(core["paused"])
    by_source = bool(agent.get("source_paused"))
    status = None
    if agent.get("status_updated_at") is not None:
        status = {
            "isPaused": by_source,
            "lastJobId": agent["last_job_id"] or None,
            "lastJobState": agent["last_job_state"] or None,
            "progress": agent["progress"],
            "message": agent["status_message"],
            "updatedAt": agent["status_updated_at"],
        }
    approved = agent["state"] == "approved"
    count = int(agent.get("recovery_point_count") or 0)
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
        "pauseReplication": by_source,
        "pausedByOperator": by_operator,
        "isReplicationPaused": by_source or by_operator,
        "isReplicating": is_replicating(agent, core),
        "isRecoveryPointsOnly": count > 0 and not approved,
        "status": status,
        "recoveryPointCount": count,
        "lastReplicatedRecoveryPointTimestamp": agent.get("newest"),
        "oldestRecoveryPointTimestamp": agent.get("oldest"),
        "lastSeededRecoveryPointTimestamp": None,
    }


@dataclass(frozen=True)
class StatusUpdate:
    """What `PUT slave/agents/{agentId}/status` may set (None: leave as it is)."""

    paused: bool | None = None
    last_job_id: str | None = None
    last_job_state: str | None = None
    progress: float | None = None
    message: str | None = None


def set_status(
    conn: apsw.Connection, agent_pk: int, update: StatusUpdate, now: float
) -> dict[str, Any]:
    state = update.last_job_state
    if state is not None:
        state = state.lower()
        if state not in JOB_STATES:
            raise Unprocessable(
                f"lastJobState must be one of {', '.join(JOB_STATES)}", field="lastJobState"
            )
    if update.progress is not None and not 0 <= update.progress <= 100:
        raise Unprocessable("progress is a percentage, 0..100", field="progress")
    conn.execute(
        "INSERT INTO agent_status(agent_pk, updated_at) VALUES (?, ?)"
        " ON CONFLICT (agent_pk) DO NOTHING",
        (agent_pk, now),
    )
    for column, value in (
        ("paused", None if update.paused is None else int(update.paused)),
        ("last_job_id", update.last_job_id),
        ("last_job_state", state),
        ("progress", update.progress),
        ("message", update.message),
    ):
        if value is not None:
            conn.execute(
                f"UPDATE agent_status SET {column} = ? WHERE agent_pk = ?", (value, agent_pk)
            )
    conn.execute("UPDATE agent_status SET updated_at = ? WHERE agent_pk = ?", (now, agent_pk))
    found = row(conn, "SELECT * FROM agent_status WHERE agent_pk = ?", (agent_pk,))
    assert found is not None
    return {
        "isPaused": bool(found["paused"]),
        "lastJobId": found["last_job_id"] or None,
        "lastJobState": found["last_job_state"] or None,
        "progress": found["progress"],
        "message": found["message"],
        "updatedAt": found["updated_at"],
    }


def set_operator_pause(conn: apsw.Connection, agent_pk: int, paused: bool) -> None:
    conn.execute("UPDATE agents SET paused = ? WHERE id = ?", (int(paused), agent_pk))


def protected_bytes(conn: apsw.Connection, agent_pk: int) -> int:
    """Bytes of the agent's volumes as of their newest images (what it protects)."""
    found = conn.execute(
        "SELECT coalesce(sum(vi.size), 0) FROM volume_images vi WHERE vi.agent_pk = ?"
        " AND vi.epoch_number = (SELECT max(epoch_number) FROM volume_images x"
        " WHERE x.agent_pk = vi.agent_pk AND x.driver_volume_id = vi.driver_volume_id)",
        (agent_pk,),
    ).fetchone()
    return int(found[0])


def usage(conn: apsw.Connection, core_pk: int) -> list[dict[str, Any]]:
    """Per agent of the core: bytes protected, stored bytes unique to it, its proportional
    share of records it shares with other agents of its repositories (a record referenced by
    n agents counts 1/n for each, rounded down), and its recovery point count."""
    mine = {a["id"]: a for a in agent_rows(conn, core_pk)}
    unique: dict[int, int] = defaultdict(int)
    shared: dict[int, float] = defaultdict(float)
    records_of: dict[int, int] = defaultdict(int)
    repository_ids = {
        r["repository_id"]
        for r in rows(
            conn,
            "SELECT DISTINCT vi.repository_id FROM volume_images vi JOIN agents a"
            " ON a.id = vi.agent_pk WHERE a.core_pk = ?",
            (core_pk,),
        )
    }
    for repository_id in sorted(repository_ids):
        for found in rows(
            conn,
            "WITH refs AS (SELECT DISTINCT vi.agent_pk, ib.key FROM image_blocks ib"
            "   JOIN volume_images vi ON vi.id = ib.image_id WHERE vi.repository_id = :repo),"
            " sharing AS (SELECT key, count(*) AS n FROM refs GROUP BY key)"
            " SELECT refs.agent_pk, sharing.n, count(*) AS records,"
            "   sum(r.stored_length) AS bytes FROM refs JOIN sharing ON sharing.key = refs.key"
            " JOIN records r ON r.repository_id = :repo AND r.key = refs.key"
            " WHERE refs.agent_pk IN (SELECT id FROM agents WHERE core_pk = :core)"
            " GROUP BY refs.agent_pk, sharing.n",
            {"repo": repository_id, "core": core_pk},
        ):
            agent_pk = found["agent_pk"]
            records_of[agent_pk] += found["records"]
            if found["n"] == 1:
                unique[agent_pk] += found["bytes"]
            else:
                shared[agent_pk] += found["bytes"] / found["n"]
    answer = []
    for agent_pk, agent in mine.items():
        share = int(shared[agent_pk])
        answer.append(
            {
                "agentId": agent["agent_id"],
                "displayName": agent["display_name"],
                "repositoryId": agent["repository_id"],
                "bytesProtected": protected_bytes(conn, agent_pk),
                "bytesStoredUnique": unique[agent_pk],
                "bytesStoredShared": share,
                "bytesStored": unique[agent_pk] + share,
                "recordCount": records_of[agent_pk],
                "recoveryPointCount": int(agent["recovery_point_count"] or 0),
            }
        )
    return answer


# --------------------------------------------------------------------------
# Recovery points and volume images
# --------------------------------------------------------------------------


def orphan_epochs(image_rows: list[dict[str, Any]]) -> dict[int, int | None]:
    """Image id -> the first missing epoch of its chain (None when the chain is whole), for
    the images of one agent (all of its images must be in `image_rows`)."""
    by_epoch = {(i["driver_volume_id"], i["epoch_number"]): i for i in image_rows}
    missing: dict[int, int | None] = {}

    def resolve(image: dict[str, Any]) -> int | None:
        trail = []
        current = image
        answer: int | None = None
        while True:
            if current["id"] in missing:
                answer = missing[current["id"]]
                break
            trail.append(current["id"])
            previous = current["previous_epoch_number"]
            if previous is None:
                answer = None
                break
            parent = by_epoch.get((current["driver_volume_id"], previous))
            if parent is None:
                answer = previous
                break
            current = parent
        for image_id in trail:
            missing[image_id] = answer
        return answer

    for image in image_rows:
        resolve(image)
    return missing


def _images(conn: apsw.Connection, agent_pk: int) -> list[dict[str, Any]]:
    return rows(
        conn,
        "SELECT vi.id, vi.driver_volume_id, vi.epoch_number, vi.previous_epoch_number,"
        " vi.size, vi.block_size, vi.keys_checksum, vi.committed_at, vi.recovery_point_pk,"
        " vi.repository_id, rp.recovery_point_id, rp.timestamp, rp.complete"
        " FROM volume_images vi JOIN recovery_points rp ON rp.id = vi.recovery_point_pk"
        " WHERE vi.agent_pk = ? ORDER BY vi.driver_volume_id, vi.epoch_number",
        (agent_pk,),
    )


def recovery_point_count(conn: apsw.Connection, agent_pk: int) -> int:
    return int(
        conn.execute(
            "SELECT count(*) FROM recovery_points WHERE agent_pk = ? AND complete = 1",
            (agent_pk,),
        ).fetchone()[0]
    )


def recovery_points(
    conn: apsw.Connection, agent_pk: int, skip: int = 0, limit: int | None = None
) -> list[dict[str, Any]]:
    """The agent's complete recovery points, newest first, `skip` then at most `limit`."""
    if skip < 0 or skip > MAX_SKIP:
        raise Unprocessable(f"skipCount must be 0..{MAX_SKIP}", field="skipCount")
    if limit is not None and not 0 <= limit <= MAX_PAGE:
        raise Unprocessable(f"maxCount must be 0..{MAX_PAGE}", field="maxCount")
    points = rows(
        conn,
        f"SELECT rp.* FROM recovery_points rp WHERE rp.agent_pk = ? AND rp.complete = 1 {_ORDER}"
        " LIMIT ? OFFSET ?",
        (agent_pk, -1 if limit is None else limit, skip),
    )
    if not points:
        return []
    all_images = _images(conn, agent_pk)
    missing = orphan_epochs(all_images)
    by_point: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for image in all_images:
        by_point[image["recovery_point_pk"]].append(image)
    answer = []
    for point in points:
        held = by_point[point["id"]]
        answer.append(
            {
                "id": point["recovery_point_id"],
                "timestamp": point["timestamp"],
                "volumeCount": point["volume_count"],
                "sizeBytes": sum(i["size"] for i in held),
                "isOrphaned": any(missing[i["id"]] is not None for i in held),
                "volumeImages": [
                    {
                        "id": f"{i['driver_volume_id']}:{i['epoch_number']}",
                        "driverVolumeId": i["driver_volume_id"],
                        "epochNumber": i["epoch_number"],
                        "previousEpochNumber": i["previous_epoch_number"],
                        "size": i["size"],
                        "isOrphaned": missing[i["id"]] is not None,
                    }
                    for i in held
                ],
            }
        )
    return answer


def _cell(decision: retention.Decision | None) -> dict[str, Any] | None:
    if decision is None or decision.cell is None:
        return None
    lower, upper, ad_hoc = decision.cell
    return {
        "lowerBound": retention.iso(lower),
        "upperBound": retention.iso(upper),
        "isAdHoc": ad_hoc,
    }


def volume_images(
    conn: apsw.Connection,
    agent_pk: int,
    *,
    orphaned_only: bool = False,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Every committed volume image of the agent with the CONTRACTS.md fields (orphaned ones
    only with `orphaned_only`), oldest epoch first per volume. `rollupGranularityCell` is
    the retention cell its recovery point stands for under the agent's policy now: ad hoc
    (lower = upper = its timestamp) while no rule has rolled it into an hour, day, week or
    month."""
    found = _images(conn, agent_pk)
    missing = orphan_epochs(found)
    _, decisions, _ = retention.agent_plan(conn, agent_pk, now or retention.utc_now())
    answer = []
    for image in found:
        lost = missing[image["id"]]
        if orphaned_only and lost is None:
            continue
        entry = {
            "id": f"{image['driver_volume_id']}:{image['epoch_number']}",
            "driverVolumeId": image["driver_volume_id"],
            "epochNumber": image["epoch_number"],
            "previousEpochNumber": image["previous_epoch_number"],
            "headerHash": None,
            "isOrphaned": lost is not None,
            "utcCreatedTimestamp": image["timestamp"],
            "volumeImageHash": image["keys_checksum"],
            "rollupGranularityCell": _cell(decisions.get(image["recovery_point_pk"])),
            "recoveryPointId": image["recovery_point_id"],
            "isRecoveryPointComplete": bool(image["complete"]),
            "size": image["size"],
            "blockSize": image["block_size"],
        }
        if lost is not None:
            entry["missingEpochNumber"] = lost
        answer.append(entry)
    return answer


def rps_info(conn: apsw.Connection, core_pk: int) -> list[dict[str, Any]]:
    """Per agent of the core that has complete recovery points: count, oldest, newest and
    repository (CONTRACTS: rpsinfo)."""
    return [
        {
            "agentId": a["agent_id"],
            "agentDisplayName": a["display_name"],
            "recoveryPointCount": int(a["recovery_point_count"]),
            "oldestTimeStamp": a["oldest"],
            "newestTimeStamp": a["newest"],
            "repositoryId": a["repository_id"],
            "repositoryName": a["repository_name"],
        }
        for a in agent_rows(conn, core_pk)
        if a["recovery_point_count"]
    ]


def relationships(conn: apsw.Connection, core_pk: int) -> list[dict[str, Any]]:
    """Which repository each approved agent of the core lives in."""
    return [
        {
            "agentId": a["agent_id"],
            "agentDisplayName": a["display_name"],
            "repositoryId": a["repository_id"],
            "repositoryName": a["repository_name"],
        }
        for a in agents.with_repositories(conn, core_pk)
        if a["state"] == "approved" and a["repository_id"] is not None
    ]


# --------------------------------------------------------------------------
# Adding agents to an existing pairing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WantedAgent:
    """One agent a paired source asks to add, with the repository it names (if any)."""

    agent: agents.AgentRequest
    repository: str | None = None
    field: str = "agents"


def _repository(conn: apsw.Connection, name: str | None) -> dict[str, Any] | None:
    if name is None:
        return None
    found = row(conn, "SELECT * FROM repositories WHERE name = ?", (name,))
    return found


def verify(
    conn: apsw.Connection,
    core: dict[str, Any],
    wanted: list[WantedAgent],
    *,
    by_demand: bool,
    room: Any,
) -> list[dict[str, Any]]:
    """Per agent: can it be added now, and why not. Looks only at the caller's own agents.
    `room(conn, repository_row)` is the free space of a repository (bytes)."""
    answer = []
    for item in wanted:
        reasons: list[str] = []
        agent_id = item.agent.agent_id
        if agent_id in RESERVED_AGENT_IDS:
            reasons.append(f"{agent_id!r} is reserved and cannot be an agent id")
        existing = agents.get(conn, core["id"], agent_id)
        if existing is not None and existing["state"] in ("approved", "pending"):
            reasons.append(f"the agent is already present on this core ({existing['state']})")
        target: dict[str, Any] | None = None
        if item.repository is not None:
            target = _repository(conn, item.repository)
            if target is None:
                reasons.append(f"no repository named {item.repository!r} on this core")
        elif existing is not None and existing["repository_id"] is not None:
            target = repositories.by_id(conn, existing["repository_id"])
        elif core["repository_id"] is not None:
            target = row(conn, "SELECT * FROM repositories WHERE id = ?", (core["repository_id"],))
        if target is not None and room(conn, target) <= 0:
            reasons.append(
                f"repository {target['name']} has no space left (its quota is used up or the"
                " disk is full)"
            )
        if core["paused"]:
            reasons.append("replication from this source is paused by the operator")
        if existing is not None and existing["paused"]:
            reasons.append("replication of this agent is paused by the operator")
        answer.append(
            {
                "agentId": agent_id,
                "canAdd": not reasons,
                "reasons": reasons,
                "method": "demand" if by_demand else "request",
                "repositoryName": target["name"] if target else None,
            }
        )
    return answer


def _check_wanted(conn: apsw.Connection, core: dict[str, Any], wanted: list[WantedAgent]) -> None:
    for item in wanted:
        check_new_agent_id(item.agent.agent_id, f"{item.field}.agentInfo.id")
        if item.repository is not None and _repository(conn, item.repository) is None:
            raise Unprocessable(
                f"no repository named {item.repository!r}", field=f"{item.field}.repositoryName"
            )
        existing = agents.get(conn, core["id"], item.agent.agent_id)
        if existing is not None and existing["state"] == "approved":
            raise Conflict(
                f"agent {item.agent.agent_id!r} is already approved on this core",
                field=f"{item.field}.agentInfo.id",
            )


def request_agents(
    conn: apsw.Connection, core: dict[str, Any], wanted: list[WantedAgent], now: float
) -> list[dict[str, Any]]:
    """Add agents to the caller's pairing as pending (the operator approves each with
    `replicore agents approve`); a named repository is remembered for that approval."""
    _check_wanted(conn, core, wanted)
    agents.request(conn, core["id"], [item.agent for item in wanted])
    for item in wanted:
        agent = agents.get(conn, core["id"], item.agent.agent_id)
        assert agent is not None
        conn.execute("DELETE FROM agent_request_repositories WHERE agent_pk = ?", (agent["id"],))
        target = _repository(conn, item.repository)
        if target is not None:
            conn.execute(
                "INSERT INTO agent_request_repositories(agent_pk, repository_id, requested_at)"
                " VALUES (?, ?, ?)",
                (agent["id"], target["id"], now),
            )
    return [
        agents.describe(a, bool(core["paused"]))
        for a in agents.with_repositories(conn, core["id"])
        if a["agent_id"] in {item.agent.agent_id for item in wanted}
    ]


def _default_repository(conn: apsw.Connection, core: dict[str, Any]) -> int:
    if core["repository_id"] is not None and row(
        conn, "SELECT id FROM repositories WHERE id = ?", (core["repository_id"],)
    ):
        return int(core["repository_id"])
    repository_id = repositories.create_unique(
        conn, f"source-{core['host_name'] or core['core_id']}"
    )
    conn.execute(
        "UPDATE master_cores SET repository_id = ? WHERE id = ?", (repository_id, core["id"])
    )
    return repository_id


def demand_agents(
    conn: apsw.Connection,
    core: dict[str, Any],
    wanted: list[WantedAgent],
    default_repository: str | None,
    now: float,
) -> list[dict[str, Any]]:
    """Add agents to the caller's pairing, approved at once (administrator's word): each into
    the repository it names, else `default_repository`, else the source's own."""
    _check_wanted(conn, core, wanted)
    fallback: int | None = None
    if default_repository is not None:
        found = _repository(conn, default_repository)
        if found is None:
            raise Unprocessable(
                f"no repository named {default_repository!r}", field="repositoryName"
            )
        fallback = int(found["id"])
    agents.request(conn, core["id"], [item.agent for item in wanted])
    for item in wanted:
        target = _repository(conn, item.repository)
        repository_id = (
            int(target["id"])
            if target is not None
            else fallback
            if fallback is not None
            else _default_repository(conn, core)
        )
        conn.execute(
            "UPDATE agents SET state = 'approved', repository_id = ? WHERE core_pk = ?"
            " AND agent_id = ?",
            (repository_id, core["id"], item.agent.agent_id),
        )
    ids = {item.agent.agent_id for item in wanted}
    return [
        agents.describe(a, bool(core["paused"]))
        for a in agents.with_repositories(conn, core["id"])
        if a["agent_id"] in ids
    ]


def approve_agent(
    conn: apsw.Connection, agent_pk: int, repository: str | None, now: float
) -> dict[str, Any]:
    """The operator approves one pending agent of an approved source: into `repository`, else
    the one the source asked for, else the source's own."""
    agent = row(conn, "SELECT * FROM agents WHERE id = ?", (agent_pk,))
    assert agent is not None
    if agent["state"] != "pending":
        raise Conflict(f"agent {agent['agent_id']} is {agent['state']}, not pending")
    core = row(conn, "SELECT * FROM master_cores WHERE id = ?", (agent["core_pk"],))
    assert core is not None
    if core["state"] != "approved":
        raise Conflict(
            f"the pairing of source {core['core_id']} is {core['state']}: approve the pairing"
            " request itself (replicore pairing approve)"
        )
    if repository is not None:
        repository_id = int(repositories.by_name(conn, repository)["id"])
    else:
        asked = row(
            conn,
            "SELECT repository_id FROM agent_request_repositories WHERE agent_pk = ?",
            (agent_pk,),
        )
        repository_id = int(asked["repository_id"]) if asked else _default_repository(conn, core)
    conn.execute(
        "UPDATE agents SET state = 'approved', repository_id = ? WHERE id = ?",
        (repository_id, agent_pk),
    )
    conn.execute("DELETE FROM agent_request_repositories WHERE agent_pk = ?", (agent_pk,))
    return {
        "agentId": agent["agent_id"],
        "state": "approved",
        "repositoryName": repositories.by_id(conn, repository_id)["name"],
    }


def deny_agent(conn: apsw.Connection, agent_pk: int) -> dict[str, Any]:
    agent = row(conn, "SELECT * FROM agents WHERE id = ?", (agent_pk,))
    assert agent is not None
    if agent["state"] != "pending":
        raise Conflict(f"agent {agent['agent_id']} is {agent['state']}, not pending")
    conn.execute("UPDATE agents SET state = 'denied' WHERE id = ?", (agent_pk,))
    conn.execute("DELETE FROM agent_request_repositories WHERE agent_pk = ?", (agent_pk,))
    return {"agentId": agent["agent_id"], "state": "denied"}


# --------------------------------------------------------------------------
# The operator's view (every source)
# --------------------------------------------------------------------------


def find_agents(
    conn: apsw.Connection, agent_id: str | None = None, source: str | None = None
) -> list[dict[str, Any]]:
    """Agents of every source (or of source core id `source`; of id `agent_id`), each with
    `source_core_id`, `source_host_name`, `source_state` and the columns of `agent_rows`."""
    found = []
    for core in rows(conn, "SELECT * FROM master_cores ORDER BY core_id, id"):
        if source is not None and core["core_id"] != source:
            continue
        for agent in agent_rows(conn, core["id"]):
            if agent_id is not None and agent["agent_id"] != agent_id:
                continue
            agent["source_core_id"] = core["core_id"]
            agent["source_host_name"] = core["host_name"]
            agent["source_state"] = core["state"]
            agent["core_paused"] = core["paused"]
            found.append(agent)
    return found


def one_agent(conn: apsw.Connection, agent_id: str, source: str | None) -> dict[str, Any]:
    """The agent `agent_id` (of `source` when given); NotFound / Conflict (ambiguous)."""
    found = find_agents(conn, agent_id, source)
    if not found:
        of = f" of source {source}" if source else ""
        raise NotFound(f"no agent {agent_id!r}{of} on this core", field="agentId")
    if len(found) > 1:
        names = ", ".join(a["source_core_id"] for a in found)
        raise Conflict(f"sources {names} each have an agent {agent_id!r}: choose with --source")
    return found[0]
