"""Which repository each of the calling source's agents lives in:
`slave/cores/agentRepositoryRelationships` (GET, the original's "old method"),
`...ByDemand` (GET, with administrator credentials), `...ByCoreInfo` (PUT, the source's core
info in the body) and `...ByDemandByCoreInfo` (PUT, both).

The ByCoreInfo forms answer for the core the body names, which must be the caller: any other
core id is 403, whether or not such a core exists, so nothing is learnt about other sources.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from quart import Blueprint, g

from .. import auth, runtime
from ..bodies import Struct, json_body
from ..errors import Forbidden, Unprocessable
from ..store import inventory
from ..store.agents import AGENT_ID_PATTERN

bp = Blueprint("relationships", __name__)

BODY_LIMIT = 64 * 1024


class CoreInfo(Struct):
    id: Annotated[str, msgspec.Meta(pattern=AGENT_ID_PATTERN)]
    host_name: Annotated[str, msgspec.Meta(max_length=255)] = ""
    version: Annotated[str, msgspec.Meta(max_length=64)] = ""


class CoreInfoBody(Struct):
    """The source's core info, bare (`{"id": ...}`) or as `{"masterCoreInfo": {...}}`."""

    id: Annotated[str, msgspec.Meta(pattern=AGENT_ID_PATTERN)] | None = None
    host_name: Annotated[str, msgspec.Meta(max_length=255)] = ""
    master_core_info: CoreInfo | None = None


async def _answer() -> dict[str, Any]:
    core = g.core
    found = await runtime.current().db.read(inventory.relationships, core["id"])
    return {"coreId": core["core_id"], "relationships": found}


async def _check_core_info() -> None:
    body = await json_body(CoreInfoBody, BODY_LIMIT)
    named = body.master_core_info.id if body.master_core_info is not None else body.id
    if named is None:
        raise Unprocessable("the body must carry the source's core info (id)", field="id")
    if named != g.core["core_id"]:
        raise Forbidden(
            "the core info in the body is not the calling source's; a source may only ask"
            " about itself",
            field="id",
        )


@bp.get("/slave/cores/agentRepositoryRelationships")
@auth.paired_source
async def relationships() -> dict[str, Any]:
    """Paired source: its approved agents and their repositories."""
    return await _answer()


@bp.get("/slave/cores/agentRepositoryRelationshipsByDemand")
@auth.paired_source
async def relationships_by_demand() -> dict[str, Any]:
    """Paired source with administrator credentials (HTTP Basic): the same."""
    g.admin = await auth.check_admin()
    return await _answer()


@bp.put("/slave/cores/agentRepositoryRelationshipsByCoreInfo")
@auth.paired_source
async def relationships_by_core_info() -> dict[str, Any]:
    """Paired source, its own core info in the body: the same."""
    await _check_core_info()
    return await _answer()


@bp.put("/slave/cores/agentRepositoryRelationshipsByDemandByCoreInfo")
@auth.paired_source
async def relationships_by_demand_by_core_info() -> dict[str, Any]:
    """Paired source with administrator credentials and its own core info in the body."""
    g.admin = await auth.check_admin()
    await _check_core_info()
    return await _answer()
