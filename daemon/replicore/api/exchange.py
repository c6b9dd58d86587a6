"""Exchange DLLs: `GET slave/exchange` (the versions a source has uploaded here) and
`POST slave/exchange/dllinfo/{fileName}` (name, version, size, hashes of a DLL in the body,
or of the stored copy). DLLs arrive through upload sessions (api/uploads.py) with purpose
`exchange-dll`. Paired sources only, each seeing its own DLLs.
"""

from __future__ import annotations

from typing import Any

import trio
from quart import Blueprint, g

from .. import auth, runtime
from ..bodies import raw_body
from ..errors import NotFound
from ..store import exchange
from .jobs import with_iso_times

bp = Blueprint("exchange", __name__)


@bp.get("/slave/exchange")
@auth.paired_source
async def exchange_versions() -> dict[str, Any]:
    """Paired source: every Exchange DLL it uploaded, newest first per file name."""
    found = await runtime.current().db.read(exchange.for_core, g.core["id"])
    view: dict[str, Any] = with_iso_times(
        {"exchangeServerVersions": [exchange.api_row(r) for r in found]}
    )
    return view


@bp.post("/slave/exchange/dllinfo/<file_name>")
@auth.paired_source
async def dll_info(file_name: str) -> dict[str, Any]:
    """Paired source: with a body, the version and hashes read from it (422 if it is not a
    PE), and whether that very file is stored here; without one, the stored copy's (the
    latest upload of that name; 404 if none)."""
    rt = runtime.current()
    exchange.check_file_name(file_name)
    limit = min(rt.config.server.max_request_bytes, rt.config.uploads.max_file_bytes)
    data = await raw_body(limit)
    if not data:
        stored = await rt.db.read(exchange.latest, g.core["id"], file_name)
        if stored is None:
            raise NotFound(f"no Exchange DLL named {file_name} is stored", field="fileName")
        view: dict[str, Any] = with_iso_times({**exchange.api_row(stored), "isStored": True})
        return view
    info = await trio.to_thread.run_sync(exchange.inspect, data, file_name)
    same = await rt.db.read(exchange.has, g.core["id"], file_name, info.sha256)
    return {**info.api(), "isStored": same}
