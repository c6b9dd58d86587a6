"""Recovery points and volume images of the calling source's agents: `rps`, `rpsCount`,
`skipCount/{skipCount}/maxCount/{maxCount}/rps`, `replicatedVolumeImagesNew`,
`orphanedReplicatedVolumeImages`, and `slave/replicatedagents/rpsinfo`.

Complete recovery points only, newest first (timestamp, then arrival), so pages are stable;
images of every committed epoch with the CONTRACTS.md fields. Another source's agent is 404
(api/agents.py `own_agent`). Queries are in store/inventory.py.
"""

from __future__ import annotations

from typing import Any

import apsw
from quart import Blueprint, g

from .. import auth, runtime
from ..errors import Unprocessable
from ..store import inventory
from .agents import own_agent

bp = Blueprint("recovery_points", __name__)


def _bounded(text: str, name: str, largest: int) -> int:
    """A path segment that must be a whole number 0..largest (422 naming it otherwise)."""
    if not text.isascii() or not text.isdigit() or len(text) > 12 or int(text) > largest:
        raise Unprocessable(f"{name} must be a whole number 0..{largest}, not {text!r}", field=name)
    return int(text)


def _points(
    conn: apsw.Connection, core_pk: int, agent_id: str, skip: int, limit: int | None
) -> list[dict[str, Any]]:
    agent = own_agent(conn, core_pk, agent_id)
    return inventory.recovery_points(conn, agent["id"], skip, limit)


@bp.get("/slave/agents/<agent_id>/rps")
@auth.paired_source
async def list_rps(agent_id: str) -> dict[str, Any]:
    """Paired source: every complete recovery point of its agent, newest first."""
    found = await runtime.current().db.read(_points, g.core["id"], agent_id, 0, None)
    return {"agentId": agent_id, "recoveryPoints": found}


def _count(conn: apsw.Connection, core_pk: int, agent_id: str) -> int:
    return inventory.recovery_point_count(conn, own_agent(conn, core_pk, agent_id)["id"])


@bp.get("/slave/agents/<agent_id>/rpsCount")
@auth.paired_source
async def rps_count(agent_id: str) -> dict[str, Any]:
    """Paired source: how many complete recovery points its agent has."""
    count = await runtime.current().db.read(_count, g.core["id"], agent_id)
    return {"agentId": agent_id, "count": count}


@bp.get("/slave/agents/<agent_id>/skipCount/<skip_count>/maxCount/<max_count>/rps")
@auth.paired_source
async def rps_page(agent_id: str, skip_count: str, max_count: str) -> dict[str, Any]:
    """Paired source: a page of its agent's recovery points (newest first): skip
    `skipCount`, then at most `maxCount` (0..1000)."""
    skip = _bounded(skip_count, "skipCount", inventory.MAX_SKIP)
    limit = _bounded(max_count, "maxCount", inventory.MAX_PAGE)
    found = await runtime.current().db.read(_points, g.core["id"], agent_id, skip, limit)
    return {
        "agentId": agent_id,
        "skipCount": skip,
        "maxCount": limit,
        "recoveryPoints": found,
    }


def _images(
    conn: apsw.Connection, core_pk: int, agent_id: str, orphaned_only: bool
) -> list[dict[str, Any]]:
    agent = own_agent(conn, core_pk, agent_id)
    return inventory.volume_images(conn, agent["id"], orphaned_only=orphaned_only)


@bp.get("/slave/agents/<agent_id>/replicatedVolumeImagesNew")
@auth.paired_source
async def volume_images(agent_id: str) -> dict[str, Any]:
    """Paired source: every committed volume image of its agent."""
    found = await runtime.current().db.read(_images, g.core["id"], agent_id, False)
    return {"agentId": agent_id, "volumeImages": found}


@bp.get("/slave/agents/<agent_id>/orphanedReplicatedVolumeImages")
@auth.paired_source
async def orphaned_volume_images(agent_id: str) -> dict[str, Any]:
    """Paired source: the volume images of its agent whose chain is broken (an epoch they
    build on is not on this core), each with `missingEpochNumber`."""
    found = await runtime.current().db.read(_images, g.core["id"], agent_id, True)
    return {"agentId": agent_id, "volumeImages": found}


@bp.get("/slave/replicatedagents/rpsinfo")
@auth.paired_source
async def rps_info() -> dict[str, Any]:
    """Paired source: per agent of its own with recovery points here: count, oldest, newest,
    repository."""
    found = await runtime.current().db.read(inventory.rps_info, g.core["id"])
    return {"agents": found}
