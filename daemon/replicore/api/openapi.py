"""`GET replicationcomms/openapi.json` (anonymous): the OpenAPI 3.1 description of this API,
built from the app's routes by `replicore.openapi`, with what the routes cannot say by
themselves written here: the request body and the query/header parameters of each route,
keyed by endpoint name. Body types are the handlers' own msgspec Structs, named as
"module:Name" so that this table imports nothing at start. Every POST and PUT route must
be listed (tests/test_fuzz_api.py checks it), with `NO_BODY` when it reads none.
Reference: docs/api/openapi.md.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, current_app

from .. import auth, openapi, runtime
from ..openapi import NO_BODY, Param, RequestSpec, header

bp = Blueprint("openapi", __name__)

PATH = "/openapi.json"

_A = "replicore.api."


def _json(module: str, name: str, **kwargs: Any) -> RequestSpec:
    return RequestSpec(body=f"{_A}{module}:{name}", **kwargs)


_COMMIT = Param(
    "commit",
    "true: commit the image (body {blockCount, keysChecksum}); false: discard it",
    required=True,
)
_USE_CREDENTIALS = Param("useCredentials", "true: check the HTTP Basic credentials too")
_BY_DEMAND = "required"
_RKY1 = "RKY1 key list: block index, record key, length per block (docs/protocol.md)"
_RRD1 = "RRD1 record stream: records framed with index, key, lengths, codec (docs/protocol.md)"

REQUESTS: dict[str, RequestSpec] = {
    # discovery and pairing
    "discovery.validate": RequestSpec(params=(_USE_CREDENTIALS,), admin_credentials="optional"),
    "discovery.verify_start": _json(
        "pairing", "VerifyStartBody", params=(_USE_CREDENTIALS,), admin_credentials="optional"
    ),
    "pairing.request_pairing": _json("pairing", "RequestBody"),
    "pairing.sync": NO_BODY,
    "pairing.demand": _json("pairing", "DemandBody"),
    "pairing.unpair": RequestSpec(
        params=(Param("deleteRecoveryPoints", "true: ask for the agents' data to be deleted"),)
    ),
    "cores.masters": RequestSpec(params=(Param("all", "true: every state, not only approved"),)),
    # agents and inventory
    "agents.list_agents": RequestSpec(
        params=(
            Param("view", "which agents", kind="string", choices=("replicating", "usage", "all")),
        )
    ),
    "agents.put_status": _json("agents", "StatusBody"),
    "agents.request_agents": _json("agents", "AddAgentsBody"),
    "agents.demand_agents": _json("agents", "AddAgentsBody", admin_credentials=_BY_DEMAND),
    "agents.verify_request": _json("agents", "AddAgentsBody"),
    "agents.verify_demand": _json("agents", "AddAgentsBody", admin_credentials="optional"),
    "relationships.relationships_by_demand": RequestSpec(admin_credentials=_BY_DEMAND),
    "relationships.relationships_by_core_info": _json("relationships", "CoreInfoBody"),
    "relationships.relationships_by_demand_by_core_info": _json(
        "relationships", "CoreInfoBody", admin_credentials=_BY_DEMAND
    ),
    # data path
    "datapath.new_session": _json("sessions", "NewSessionBody"),
    "datapath.record_keys": RequestSpec(binary=_RKY1),
    "datapath.record_data": RequestSpec(binary=_RRD1),
    "datapath.end_session": _json(
        "sessions",
        "CommitBody",
        body_required=False,
        params=(_COMMIT,),
        note="Body only with commit=true.",
    ),
    "datapath.start_end_session": _json(
        "sessions",
        "CommitBody",
        body_required=False,
        params=(_COMMIT,),
        note="Body only with commit=true.",
    ),
    "datapath.poke": NO_BODY,
    # direct replication
    "direct.new_direct_session": _json("sessions", "NewSessionBody"),
    "direct.snapshot_file": _json("direct", "SnapshotFileBody"),
    "direct.bitmap": RequestSpec(binary="the used-block bitmap: one bit per block, LSB first"),
    "direct.o3e_data": RequestSpec(
        binary="the used blocks from X-O3E-Block-Index on, raw or framed (docs/api)",
        params=(
            header(
                "X-O3E-Block-Index", "index of the first block sent", kind="integer", required=True
            ),
            header(
                "X-O3E-Codec", "raw (default) or framed", kind="string", choices=("raw", "framed")
            ),
        ),
    ),
    # jobs and metadata
    "jobs.replication_job_start": _json("jobs", "StartBody"),
    "jobs.replication_job_sync": _json("jobs", "SyncBody"),
    "jobs.transfer_job": _json("jobs", "TransferBody", body_required=False),
    "metadata.metadata_update": _json("metadata", "AgentMetadata"),
    "metadata.metadata_update_job": _json("metadata", "MetadataJobBody"),
    # uploads, Exchange, storage
    "uploads.new_session": _json("uploads", "NewSessionBody"),
    "uploads.upload_data": RequestSpec(
        binary="one chunk of the file, exactly dataSize bytes",
        params=(header("X-Upload-Offset", "bytes received so far", kind="integer", required=True),),
    ),
    "uploads.end_session": NO_BODY,
    "exchange.dll_info": RequestSpec(
        binary="a DLL to inspect; empty: describe the stored copy", body_required=False
    ),
    "storage.storage_report": _json("storage", "StorageReport"),
}


@bp.get(PATH)
@auth.anonymous
async def openapi_json() -> dict[str, Any]:
    """Anonymous: the OpenAPI 3.1 description of this API (built once per process)."""
    rt = runtime.current()
    document: dict[str, Any] | None = rt.extras.get("openapi.document")
    if document is None:
        root = rt.config.server.url_prefix + "/replicationcomms"
        document = openapi.build(current_app, REQUESTS, root)
        rt.extras["openapi.document"] = document
    return document
