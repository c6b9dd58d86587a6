"""Agents of the calling source: `GET slave/agents/{agentId}/replication/verifyStart`.

A source sees only its own agents; another source's agent, or an unknown id, is 404 without
saying which.
"""

from __future__ import annotations

from typing import Any

import apsw
from quart import Blueprint, g

from .. import auth, runtime
from ..errors import NotFound
from ..store import agents, repositories
from .repositories import disk_free, space

bp = Blueprint("agents", __name__)


def own_agent(conn: apsw.Connection, core_pk: int, agent_id: str) -> dict[str, Any]:
    """The caller's agent, or 404."""
    found = agents.get(conn, core_pk, agent_id)
    if found is None:
        raise NotFound(f"this source has no agent {agent_id!r} on this core", field="agentId")
    return found


def _replication_ability(
    conn: apsw.Connection, core: dict[str, Any], agent_id: str, free_on_disk: int
) -> dict[str, Any]:
    agent = own_agent(conn, core["id"], agent_id)
    reasons: list[str] = []
    if agent["state"] != "approved":
        reasons.append(f"the agent is {agent['state']}, not approved")
    repository: dict[str, Any] | None = None
    room: dict[str, Any] = {}
    if agent["repository_id"] is not None:
        repository = repositories.by_id(conn, agent["repository_id"])
        room = space(conn, repository, free_on_disk)
        if room["freeBytes"] <= 0:
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
        "freeBytes": room.get("freeBytes"),
        "isReplicationPaused": paused,
    }


@bp.get("/slave/agents/<agent_id>/replication/verifyStart")
@auth.paired_source
async def verify_start(agent_id: str) -> dict[str, Any]:
    """Paired source: can this agent of its own replicate now, and if not, why."""
    rt = runtime.current()
    return await rt.db.read(_replication_ability, g.core, agent_id, disk_free())
