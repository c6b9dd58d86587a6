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
from ..store import agents, repositories, sessions

bp = Blueprint("repositories", __name__)


def disk_free() -> int:
    """Free bytes on the file system of the state directory."""
    return shutil.disk_usage(runtime.current().config.server.state_dir).free


def space(conn: apsw.Connection, repository: dict[str, Any], free_on_disk: int) -> dict[str, Any]:
    """A repository's room: `quotaBytes` (None: no quota), `usedBytes`, `reservedBytes` (open
    sessions' reservations here), `quotaFreeBytes` (quota left after used and reserved),
    `diskFreeBytes` (disk free less every session's reservation), `freeBytes` (the smaller:
    what may still be stored) and `sizeBytes` (the quota, or used plus disk free)."""
    used = repositories.used_bytes(conn, repository["id"])
    reserved = sessions.reserved_bytes(conn, repository["id"])
    reserved_everywhere = int(
        conn.execute("SELECT coalesce(sum(reserved_bytes), 0) FROM sessions").fetchone()[0]
    )
    disk_left = max(0, free_on_disk - reserved_everywhere)
    quota = repository["quota_bytes"]
    quota_left = None if quota is None else max(0, quota - used - reserved)
    return {
        "quotaBytes": quota,
        "usedBytes": used,
        "reservedBytes": reserved,
        "quotaFreeBytes": quota_left,
        "diskFreeBytes": disk_left,
        "freeBytes": disk_left if quota_left is None else min(quota_left, disk_left),
        "sizeBytes": used + free_on_disk if quota is None else quota,
    }


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
