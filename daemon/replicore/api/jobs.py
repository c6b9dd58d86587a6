"""Mirrored jobs: `slave/agents/replicationJob/start`, `slave/agents/replicationJob/sync`,
`slave/agents/{agentId}/transferJob/{jobId}`, and the sweep that fails jobs whose source
stopped syncing them (`[jobs] sync_timeout`).

All routes are for paired sources and see only the caller's jobs and approved agents.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from quart import Blueprint, g

from .. import auth, background, runtime
from ..bodies import Count, Struct, decode_json, json_body, raw_body
from ..errors import Unprocessable
from ..runtime import Runtime
from ..store import jobs

log = logging.getLogger("replicore.jobs")

bp = Blueprint("jobs", __name__)

TIME_KEYS = frozenset({"startedAt", "lastSyncAt", "finishedAt", "updatedAt", "uploadedAt"})

Token = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Phase = Annotated[str, msgspec.Meta(max_length=64)]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
Bytes = Count
Pipelines = Annotated[int, msgspec.Meta(ge=1, le=256)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=30 * 86400)]
JobState = Literal["running", "succeeded", "failed", "cancelled"]


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> ISO 8601 UTC with milliseconds ('2026-11-05T10:00:00.000Z')."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def with_iso_times(value: Any) -> Any:
    """A store view with its `*At` epoch times written as ISO 8601."""
    if isinstance(value, dict):
        return {
            k: iso(v) if k in TIME_KEYS and isinstance(v, int | float) else with_iso_times(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [with_iso_times(v) for v in value]
    return value


class AgentSpec(Struct):
    id: Token
    volume_images_to_transfer: list[Token] = []


class StartBody(Struct):
    id: Token
    agents: list[AgentSpec]
    number_parallel_pipelines: Pipelines | None = None
    session_timeout: Seconds | None = None


class TransferProgress(Struct):
    agent_id: Token
    state: JobState | None = None
    phase: Phase | None = None
    progress: Percent | None = None
    bytes_transferred: Bytes | None = None
    bytes_total: Bytes | None = None


class SyncBody(Struct):
    id: Token
    state: JobState | None = None
    phase: Phase | None = None
    progress: Percent | None = None
    bytes_transferred: Bytes | None = None
    bytes_total: Bytes | None = None
    error_details: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    transfers: list[TransferProgress] = []


class TransferBody(Struct):
    volume_images_to_transfer: list[Token] | None = None
    number_parallel_pipelines: Pipelines | None = None
    session_timeout: Seconds | None = None


def parse_images(tokens: list[str], field: str) -> list[tuple[str, int]]:
    images = [jobs.parse_volume_image(t, f"{field}[{i}]") for i, t in enumerate(tokens)]
    if len(set(images)) != len(images):
        raise Unprocessable("a volume image is listed twice", field=field)
    return images


async def job_view(job_pk: int) -> dict[str, Any]:
    view: dict[str, Any] = with_iso_times(await runtime.current().db.read(jobs.view, job_pk))
    return view


@bp.post("/slave/agents/replicationJob/start")
@auth.paired_source
async def replication_job_start() -> tuple[dict[str, Any], int]:
    """Paired source: create the mirror of its replication job. 201 with the job when new,
    200 with it when that job was already running (a retried start)."""
    body = await json_body(StartBody)
    members = [
        jobs.AgentImages(
            a.id, parse_images(a.volume_images_to_transfer, f"agents[{i}].volumeImagesToTransfer")
        )
        for i, a in enumerate(body.agents)
    ]
    job_pk, created = await runtime.current().db.write(
        jobs.start_replication,
        g.core["id"],
        body.id,
        members,
        body.number_parallel_pipelines,
        body.session_timeout,
        time.time(),
    )
    return await job_view(job_pk), 201 if created else 200


@bp.post("/slave/agents/replicationJob/sync")
@auth.paired_source
async def replication_job_sync() -> dict[str, Any]:
    """Paired source: report progress of its job (and of its transfer children); 409 naming
    the state once the job has ended (e.g. failed by the sync timeout)."""
    body = await json_body(SyncBody)
    transfers: dict[str, jobs.Progress] = {}
    for i, t in enumerate(body.transfers):
        if t.agent_id in transfers:
            raise Unprocessable("an agent is listed twice", field=f"transfers[{i}].agentId")
        transfers[t.agent_id] = jobs.Progress(
            t.state, t.phase, t.progress, t.bytes_transferred, t.bytes_total
        )
    update = jobs.Progress(
        body.state,
        body.phase,
        body.progress,
        body.bytes_transferred,
        body.bytes_total,
        body.error_details,
    )
    job_pk = await runtime.current().db.write(
        jobs.sync, g.core["id"], body.id, update, transfers, time.time()
    )
    return await job_view(job_pk)


@bp.post("/slave/agents/<agent_id>/transferJob/<job_id>")
@auth.paired_source
async def transfer_job(agent_id: str, job_id: str) -> tuple[dict[str, Any], int]:
    """Paired source: create the transfer child of its replication job `job_id` for one
    agent (body optional). 201 with the parent job when new, 200 when it existed."""
    data = await raw_body(1024 * 1024)
    body = decode_json(data, TransferBody) if data.strip() else TransferBody()
    images = None
    if body.volume_images_to_transfer is not None:
        images = parse_images(body.volume_images_to_transfer, "volumeImagesToTransfer")
    job_pk, created = await runtime.current().db.write(
        jobs.start_transfer,
        g.core["id"],
        agent_id,
        job_id,
        images,
        body.number_parallel_pipelines,
        body.session_timeout,
        time.time(),
    )
    return await job_view(job_pk), 201 if created else 200


async def sweep_jobs(rt: Runtime) -> None:
    """Fail the jobs whose source stopped syncing."""
    timeout = rt.config.jobs.sync_timeout
    expired = await rt.db.write(jobs.expire_jobs, time.time(), timeout)
    if expired:
        log.info("failed %d job(s) not synced for %g s", len(expired), timeout)


background.periodic(
    bp, "job-sweep", sweep_jobs, lambda rt: background.sweep_interval(rt.config.jobs.sync_timeout)
)
