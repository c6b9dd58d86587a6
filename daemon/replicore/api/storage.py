"""Storage usage reports for MSP billing: `PUT slave/storage`.

A paired source reports its own usage (agents it protects and its repositories, as in the
original contract); the target stores it with the time it arrived, for `replicore billing
report`. The report may name agents that are not replicated here: it describes the source.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from quart import Blueprint, g

from .. import auth, runtime
from ..bodies import Count, Struct, json_body
from ..errors import TooManyRequests, Unprocessable
from ..store import billing

bp = Blueprint("storage", __name__)

#: Reports one source may send per hour (each one is kept for billing).
REPORTS_PER_HOUR = 120

Text = Annotated[str, msgspec.Meta(max_length=256)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class ReportedAgent(Struct):
    id: Id
    total_bytes_protected: Count
    display_name: Text = ""
    host_name: Text = ""
    recovery_point_count: Count = 0
    oldest_rp_timestamp: datetime | None = None
    newest_rp_timestamp: datetime | None = None


class ReportedRepository(Struct):
    id: Id
    bytes_used: Count
    bytes_free: Count
    name: Text = ""


class StorageReport(Struct):
    agents: Annotated[list[ReportedAgent], msgspec.Meta(max_length=10000)]
    repositories: Annotated[list[ReportedRepository], msgspec.Meta(max_length=1000)] = []


def _epoch(value: datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _unique(ids: list[str], field: str) -> None:
    seen: set[str] = set()
    for i, item in enumerate(ids):
        if item in seen:
            raise Unprocessable(f"{item!r} is listed twice", field=f"{field}[{i}].id")
        seen.add(item)


@bp.put("/slave/storage")
@auth.paired_source
async def storage_report() -> tuple[str, int]:
    """Paired source: store its storage usage report; 204 without a body."""
    rt = runtime.current()
    report = await json_body(StorageReport, limit=8 * 1024 * 1024)
    _unique([a.id for a in report.agents], "agents")
    _unique([r.id for r in report.repositories], "repositories")
    limiter = rt.limiter("storage-report", REPORTS_PER_HOUR, 3600.0)
    if not limiter.allow(str(g.core["id"])):
        raise TooManyRequests(
            f"at most {REPORTS_PER_HOUR} storage reports per hour",
            retry_after=limiter.retry_after(str(g.core["id"])),
        )
    agents = [
        billing.ReportedAgent(
            a.id,
            a.display_name,
            a.host_name,
            a.recovery_point_count,
            _epoch(a.oldest_rp_timestamp),
            _epoch(a.newest_rp_timestamp),
            a.total_bytes_protected,
        )
        for a in report.agents
    ]
    repositories = [
        billing.ReportedRepository(r.id, r.name, r.bytes_used, r.bytes_free)
        for r in report.repositories
    ]
    await rt.db.write(billing.record_report, g.core["id"], agents, repositories, time.time())
    return "", 204
