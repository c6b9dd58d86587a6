"""Agent metadata updates: `slave/agents/{agentId}/metadataUpdate` (POST starts, DELETE
cancels), `.../metadataUpdate/status` (GET) and `.../metadataUpdateJob` (POST).

An update is pending until its phase ends: the pending document becomes the agent's
metadata when the source starts the agent's transfer job, syncs the job out of phase
'metadata', or ends the job successfully; cancelling it (or the job failing) leaves the
metadata as it was. All routes are for paired sources and their approved agents only.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import msgspec
from quart import Blueprint, g

from .. import auth, runtime
from ..bodies import Count, Struct, json_body
from ..errors import Unprocessable
from ..store import jobs
from .jobs import job_view, with_iso_times

bp = Blueprint("metadata", __name__)

Name = Annotated[str, msgspec.Meta(max_length=256)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class OperatingSystem(Struct):
    name: Id
    version: Name = ""
    architecture: Annotated[str, msgspec.Meta(max_length=32)] = ""


class Volume(Struct):
    id: Id
    size: Count
    label: Name = ""
    file_system: Annotated[str, msgspec.Meta(max_length=32)] = ""


class Application(Struct):
    type: Literal["exchange", "sqlServer"]
    name: Name = ""
    version: Annotated[str, msgspec.Meta(max_length=64)] = ""


class AgentMetadata(Struct):
    display_name: Name
    host_name: Name
    operating_system: OperatingSystem | None = None
    volumes: Annotated[list[Volume], msgspec.Meta(max_length=1024)] = []
    applications: Annotated[list[Application], msgspec.Meta(max_length=256)] = []


class MetadataJobBody(AgentMetadata):
    #: The source's id for the job; a new UUID when absent.
    job_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None


def document(body: AgentMetadata) -> dict[str, Any]:
    """The metadata document as stored: the camelCase fields of AgentMetadata only."""
    seen: set[str] = set()
    for i, volume in enumerate(body.volumes):
        if volume.id in seen:
            raise Unprocessable(f"volume {volume.id!r} is listed twice", field=f"volumes[{i}].id")
        seen.add(volume.id)
    doc: dict[str, Any] = msgspec.to_builtins(AgentMetadata(**_fields(body)))
    return doc


def _fields(body: AgentMetadata) -> dict[str, Any]:
    return {name: getattr(body, name) for name in AgentMetadata.__struct_fields__}


def update_view(update: dict[str, Any]) -> dict[str, Any]:
    view: dict[str, Any] = with_iso_times(
        {
            "agentId": update["agent_id"],
            "jobId": update["job_id"],
            "runsAsOwnJob": bool(update["standalone"]),
            "state": update["state"],
            "errorDetails": update["error"],
            "startedAt": update["started_at"],
            "finishedAt": update["finished_at"],
        }
    )
    return view


async def _status(agent_id: str) -> dict[str, Any]:
    update = await runtime.current().db.read(jobs.metadata_status, g.core["id"], agent_id)
    update["agent_id"] = agent_id
    return update_view(update)


@bp.post("/slave/agents/<agent_id>/metadataUpdate")
@auth.paired_source
async def metadata_update(agent_id: str) -> tuple[dict[str, Any], int]:
    """Paired source: start the metadata update phase of the agent's current replication
    job with the agent's metadata as body; 202 with the update's status."""
    body = await json_body(AgentMetadata)
    await runtime.current().db.write(
        jobs.start_metadata_update, g.core["id"], agent_id, document(body), time.time()
    )
    return await _status(agent_id), 202


@bp.get("/slave/agents/<agent_id>/metadataUpdate/status")
@auth.paired_source
async def metadata_update_status(agent_id: str) -> dict[str, Any]:
    """Paired source: the state of the agent's latest metadata update."""
    return await _status(agent_id)


@bp.delete("/slave/agents/<agent_id>/metadataUpdate")
@auth.paired_source
async def metadata_update_cancel(agent_id: str) -> dict[str, Any]:
    """Paired source: cancel the agent's running metadata update; the metadata stays."""
    update = await runtime.current().db.write(
        jobs.cancel_metadata_update, g.core["id"], agent_id, time.time()
    )
    update["agent_id"] = agent_id
    return update_view(update)


@bp.post("/slave/agents/<agent_id>/metadataUpdateJob")
@auth.paired_source
async def metadata_update_job(agent_id: str) -> tuple[dict[str, Any], int]:
    """Paired source: run the metadata update as a job of its own; 201 with the job (200 on
    a retry with the same jobId). The source ends the job with replicationJob/sync."""
    body = await json_body(MetadataJobBody)
    job_id = body.job_id or str(uuid.uuid4())
    job_pk, created = await runtime.current().db.write(
        jobs.start_metadata_job, g.core["id"], agent_id, job_id, document(body), time.time()
    )
    return await job_view(job_pk), 201 if created else 200
