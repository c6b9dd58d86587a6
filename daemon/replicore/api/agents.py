"""Agents of the calling source: listing them (`GET slave/agents`, three views), one agent's
free space, deleting one into the recycle bin, the status a source reports, adding agents to
an existing pairing by request or by demand and verifying that beforehand, and
`slave/agents/{agentId}/replication/verifyStart`.

A source sees only its own agents; another source's agent, or an unknown id, is 404 without
saying which. The words of literal routes under `slave/agents/` (`request`, `demand`,
`replicationJob`) are never agent ids: those routes win, and `agents/{agentId}` answers 404
for them. Store work is in store/inventory.py and store/recycle_bin.py.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import apsw
import msgspec
from quart import Blueprint, g, request

from .. import auth, runtime
from ..bodies import Struct, json_body
from ..errors import NotFound, Unauthorized, Unprocessable
from ..store import agents, inventory, metadata, recycle_bin, repositories
from ..store.agents import AgentRequest
from .pairing import AgentInfo
from .repositories import disk_free, space

bp = Blueprint("agents", __name__)

BODY_LIMIT = 1024 * 1024
MAX_AGENTS = 1000
VIEWS = ("replicating", "usage", "all")

RepositoryName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class AddedAgent(Struct):
    agent_info: AgentInfo
    #: The repository wanted for this agent (request: a wish the operator sees and may
    #: change; demand: where it goes).
    repository_name: RepositoryName | None = None


class AddAgentsBody(Struct):
    agents: Annotated[list[AddedAgent], msgspec.Meta(min_length=1, max_length=MAX_AGENTS)]
    #: Demand only: the repository of every agent without its own (default: the source's).
    repository_name: RepositoryName | None = None


class StatusBody(Struct):
    #: The source pauses (true) or resumes (false) replication of this agent.
    is_paused: bool | None = None
    last_job_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    last_job_state: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    progress: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    message: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


def own_agent(conn: apsw.Connection, core_pk: int, agent_id: str) -> dict[str, Any]:
    """The caller's agent, or 404 (also for the reserved words of literal routes)."""
    found = (
        None if agent_id in inventory.RESERVED_AGENT_IDS else agents.get(conn, core_pk, agent_id)
    )
    if found is None:
        raise NotFound(f"this source has no agent {agent_id!r} on this core", field="agentId")
    return found


def free_space(conn: apsw.Connection, repository_id: int, free_on_disk: int) -> dict[str, Any]:
    """What may still be stored in the agent's repository (see `space()`); `freeSpace` is the
    smaller of the quota left and the disk left."""
    repository = repositories.by_id(conn, repository_id)
    room = space(conn, repository, free_on_disk)
    return {
        "repositoryId": repository_id,
        "repositoryName": repository["name"],
        "quotaBytes": room["quotaBytes"],
        "usedBytes": room["usedBytes"],
        "reservedBytes": room["reservedBytes"],
        "quotaFreeBytes": room["quotaFreeBytes"],
        "diskFreeBytes": room["diskFreeBytes"],
        "freeSpace": room["freeBytes"],
    }


def _room(free_on_disk: int) -> Any:
    def room(conn: apsw.Connection, repository: dict[str, Any]) -> int:
        return int(free_space(conn, repository["id"], free_on_disk)["freeSpace"])

    return room


def _with_free_space(
    conn: apsw.Connection, agent: dict[str, Any], core: dict[str, Any], free_on_disk: int
) -> dict[str, Any]:
    described = inventory.describe_agent(agent, core)
    free = None
    if agent["state"] == "approved" and agent["repository_id"] is not None:
        free = free_space(conn, agent["repository_id"], free_on_disk)["freeSpace"]
    described["freeSpace"] = free
    described["isReplicationAvailable"] = bool(described["isReplicating"] and free)
    return described


def _list(
    conn: apsw.Connection, core: dict[str, Any], view: str, free_on_disk: int
) -> dict[str, Any]:
    if view == "usage":
        found = inventory.usage(conn, core["id"])
        totals = {
            key: sum(a[key] for a in found)
            for key in ("bytesProtected", "bytesStoredUnique", "bytesStoredShared", "bytesStored")
        }
        return {"view": view, "agents": found, "totals": totals}
    described = [
        _with_free_space(conn, agent, core, free_on_disk)
        for agent in inventory.agent_rows(conn, core["id"])
    ]
    if view == "replicating":
        described = [a for a in described if a["isReplicating"]]
    return {"view": view, "agents": described}


@bp.get("/slave/agents")
@auth.paired_source
async def list_agents() -> dict[str, Any]:
    """Paired source: its agents. `?view=replicating` (default): those it replicates now;
    `usage`: storage used per agent; `all`: every agent it has on this core."""
    view = request.args.get("view") or "replicating"
    if view not in VIEWS:
        raise Unprocessable(f"view must be one of {', '.join(VIEWS)}", field="view")
    return await runtime.current().db.read(_list, g.core, view, disk_free())


def _one(
    conn: apsw.Connection, core: dict[str, Any], agent_id: str, free_on_disk: int
) -> dict[str, Any]:
    own_agent(conn, core["id"], agent_id)
    agent = inventory.agent_row(conn, core["id"], agent_id)
    assert agent is not None
    answer = _with_free_space(conn, agent, core, free_on_disk)
    if agent["state"] == "approved" and agent["repository_id"] is not None:
        answer["space"] = free_space(conn, agent["repository_id"], free_on_disk)
    else:
        answer["space"] = None
    answer["metadata"] = metadata.get(conn, agent["id"])
    return answer


@bp.get("/slave/agents/<agent_id>")
@auth.paired_source
async def get_agent(agent_id: str) -> dict[str, Any]:
    """Paired source: its agent, with the free space of its repository (`freeSpace`: the
    quota left or the disk's free space, whichever is smaller) and its metadata (as the
    source's last metadata update set it, or null)."""
    return await runtime.current().db.read(_one, g.core, agent_id, disk_free())


def _delete(
    conn: apsw.Connection, core: dict[str, Any], agent_id: str, now: float
) -> dict[str, Any]:
    agent = own_agent(conn, core["id"], agent_id)
    done = recycle_bin.bin_agent(
        conn, agent["id"], reason="source", deleted_by=f"source {core['core_id']}", now=now
    )
    return {
        "agentId": agent_id,
        "deleted": True,
        "recoveryPointCount": done["recoveryPointCount"],
    }


@bp.delete("/slave/agents/<agent_id>")
@auth.paired_source
async def delete_agent(agent_id: str) -> dict[str, Any]:
    """Paired source: delete its agent with all its recovery points. They go to the recycle
    bin, out of the source's sight and quota, where only the operator can restore or purge
    them (they are purged when `recycle_bin.retention_days` have passed)."""
    return await runtime.current().db.write(_delete, g.core, agent_id, time.time())


def _set_status(
    conn: apsw.Connection,
    core: dict[str, Any],
    agent_id: str,
    update: inventory.StatusUpdate,
    now: float,
) -> dict[str, Any]:
    agent = own_agent(conn, core["id"], agent_id)
    status = inventory.set_status(conn, agent["id"], update, now)
    return {"agentId": agent_id, "status": status}


@bp.put("/slave/agents/<agent_id>/status")
@auth.paired_source
async def put_status(agent_id: str) -> dict[str, Any]:
    """Paired source: set the replication status of its agent as the target shows it (its
    own pause or resume, last job id and state, progress, a message)."""
    body = await json_body(StatusBody, BODY_LIMIT)
    update = inventory.StatusUpdate(
        paused=body.is_paused,
        last_job_id=body.last_job_id,
        last_job_state=body.last_job_state,
        progress=body.progress,
        message=body.message,
    )
    return await runtime.current().db.write(_set_status, g.core, agent_id, update, time.time())


# --------------------------------------------------------------------------
# Adding agents to the pairing
# --------------------------------------------------------------------------


def _wanted(body: AddAgentsBody) -> list[inventory.WantedAgent]:
    seen: set[str] = set()
    wanted = []
    for index, entry in enumerate(body.agents):
        info, field = entry.agent_info, f"agents[{index}]"
        if info.id in seen:
            raise Unprocessable(f"agent {info.id!r} is listed twice", field=f"{field}.agentInfo.id")
        seen.add(info.id)
        if entry.repository_name is not None:
            try:
                repositories.check_name(entry.repository_name)
            except Unprocessable as error:
                raise Unprocessable(error.message, field=f"{field}.repositoryName") from None
        wanted.append(
            inventory.WantedAgent(
                agent=AgentRequest(
                    agent_id=info.id,
                    display_name=info.display_name,
                    host_name=info.host_name,
                    repository_type=info.repository_type,
                ),
                repository=entry.repository_name,
                field=field,
            )
        )
    return wanted


async def _credentials_valid() -> bool:
    try:
        await auth.check_admin()
    except Unauthorized:
        return False
    return True


@bp.post("/slave/agents/request")
@auth.paired_source
async def request_agents() -> dict[str, Any]:
    """Paired source: ask to add agents to its pairing; each waits, pending, until the
    operator approves it (`replicore agents approve`)."""
    body = await json_body(AddAgentsBody, BODY_LIMIT)
    wanted = _wanted(body)
    found = await runtime.current().db.write(inventory.request_agents, g.core, wanted, time.time())
    return {"agents": found}


@bp.post("/slave/agents/demand")
@auth.paired_source
async def demand_agents() -> dict[str, Any]:
    """Paired source with administrator credentials (HTTP Basic): add agents, approved at
    once, into the repositories named (default: the source's own)."""
    g.admin = await auth.check_admin()
    body = await json_body(AddAgentsBody, BODY_LIMIT)
    wanted = _wanted(body)
    if body.repository_name is not None:
        try:
            repositories.check_name(body.repository_name)
        except Unprocessable as error:
            raise Unprocessable(error.message, field="repositoryName") from None
    found = await runtime.current().db.write(
        inventory.demand_agents, g.core, wanted, body.repository_name, time.time()
    )
    return {"agents": found}


async def _verify(by_demand: bool) -> dict[str, Any]:
    credentials = await _credentials_valid() if by_demand else None
    body = await json_body(AddAgentsBody, BODY_LIMIT)
    wanted = _wanted(body)
    if by_demand and body.repository_name is not None:
        wanted = [
            item
            if item.repository is not None
            else inventory.WantedAgent(item.agent, body.repository_name, item.field)
            for item in wanted
        ]
    found = await runtime.current().db.read(
        inventory.verify, g.core, wanted, by_demand=by_demand, room=_room(disk_free())
    )
    if credentials is False:
        for entry in found:
            entry["canAdd"] = False
            entry["reasons"].insert(0, "the administrator credentials are not valid")
    return {
        "method": "demand" if by_demand else "request",
        "credentialsValid": credentials,
        "canAddAll": all(entry["canAdd"] for entry in found),
        "agents": found,
    }


@bp.post("/slave/request/agents/verify")
@auth.paired_source
async def verify_request() -> dict[str, Any]:
    """Paired source: per agent, could it be added by request now, and why not."""
    return await _verify(by_demand=False)


@bp.post("/slave/demand/agents/verify")
@auth.paired_source
async def verify_demand() -> dict[str, Any]:
    """Paired source: per agent, could it be added by demand now (with the administrator
    credentials sent), and why not."""
    return await _verify(by_demand=True)


# --------------------------------------------------------------------------
# verifyStart
# --------------------------------------------------------------------------


def _replication_ability(
    conn: apsw.Connection, core: dict[str, Any], agent_id: str, free_on_disk: int
) -> dict[str, Any]:
    agent = own_agent(conn, core["id"], agent_id)
    reasons: list[str] = []
    if agent["state"] != "approved":
        reasons.append(f"the agent is {agent['state']}, not approved")
    repository: dict[str, Any] | None = None
    free: int | None = None
    if agent["repository_id"] is not None:
        repository = repositories.by_id(conn, agent["repository_id"])
        free = free_space(conn, agent["repository_id"], free_on_disk)["freeSpace"]
        if free <= 0:
            reasons.append(
                f"repository {repository['name']} has no space left "
                "(its quota is used up or the disk is full)"
            )
    elif agent["state"] == "approved":
        reasons.append("the agent has no repository")
    paused = bool(agent["paused"]) or bool(core["paused"])
    if agent["paused"]:
        reasons.append("replication of this agent is paused on this core")
    if core["paused"]:
        reasons.append("replication from this source is paused on this core")
    return {
        "agentId": agent["agent_id"],
        "canReplicate": not reasons,
        "isReplicationAvailable": not reasons,
        "reasons": reasons,
        "state": agent["state"],
        "repositoryName": repository["name"] if repository else None,
        "freeBytes": free,
        "isReplicationPaused": paused,
    }


@bp.get("/slave/agents/<agent_id>/replication/verifyStart")
@auth.paired_source
async def verify_start(agent_id: str) -> dict[str, Any]:
    """Paired source: can this agent of its own replicate now, and if not, why."""
    rt = runtime.current()
    return await rt.db.read(_replication_ability, g.core, agent_id, disk_free())
