"""`GET slave/cores/masters`: the sources paired with this core, for an administrator."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from .. import auth, runtime
from ..store import cores
from .discovery import parse_bool_arg

bp = Blueprint("cores", __name__)


@bp.get("/slave/cores/masters")
@auth.admin
async def masters() -> dict[str, Any]:
    """Administrator: the approved sources with their agents; `all=true` adds every other
    state (requests, denied, unpaired)."""
    include_all = parse_bool_arg("all")
    found = await runtime.current().db.read(cores.masters, include_all=include_all)
    return {"masters": found}
