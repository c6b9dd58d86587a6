"""`GET replicationcomms/consumedSeedDrives/{agentId}`: the seed drives consumed on this core
for one of the calling source's agents (the import itself is the operator's command,
`replicore seed-drive consume`; see store/seed_drives.py). Reference: docs/api/seed_drives.md.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, g

from .. import auth, runtime
from ..store import seed_drives

bp = Blueprint("seed_drives", __name__)


@bp.get("/consumedSeedDrives/<agent_id>")
@auth.paired_source
async def consumed_seed_drives(agent_id: str) -> dict[str, Any]:
    """Paired source, own approved agent: the drives consumed for it, oldest first."""
    return await runtime.current().db.read(seed_drives.consumed_for_agent, g.core["id"], agent_id)
