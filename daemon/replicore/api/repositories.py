"""`GET slave/repositories`: the repositories a paired source's agents use, with their space.

`space()` is the one place that says how much room a repository has left: the quota minus
what is used, bounded by the free space of the disk holding the state directory. Other
endpoints that report free space (an agent's, verifyStart) use it.
"""

from __future__ import annotations

import shutil
from typing import Any

import apsw
from quart import Blueprint, g

from .. import auth, runtime
from ..store import agents, repositories

bp = Blueprint("repositories", __name__)


def disk_free() -> int:
    """Free bytes on the file system of the state directory."""
    return shutil.disk_usage(runtime.current().config.server.state_dir).free


def space(conn: apsw.Connection, repository: dict[str, Any], free_on_disk: int) -> dict[str, Any]:
    """`quotaBytes` (None: no quota), `usedBytes`, `freeBytes` (what may still be stored) and
    `sizeBytes` (the quota, or used plus disk free without one) of a repository row."""
    used = repositories.used_bytes(conn, repository["id"])
    quota = repository["quota_bytes"]
    if quota is None:
        free, size = free_on_disk, used + free_on_disk
    else:
        free, size = max(0, min(quota - used, free_on_disk)), quota
    return {"quotaBytes": quota, "usedBytes": used, "freeBytes": free, "sizeBytes": size}


def _for_core(conn: apsw.Connection, core_pk: int, free_on_disk: int) -> list[dict[str, Any]]:
    return [
        {
            "id": repo["id"],
            "name": repo["name"],
            **space(conn, repo, free_on_disk),
            "isDefault": repo["is_default"],
            "agents": repo["agents"],
        }
        for repo in agents.repositories_of(conn, core_pk)
    ]


@bp.get("/slave/repositories")
@auth.paired_source
async def list_repositories() -> dict[str, Any]:
    """Paired source: the repositories its approved agents (and its default) use."""
    rt = runtime.current()
    found = await rt.db.read(_for_core, g.core["id"], disk_free())
    return {"repositories": found}
