"""Jobs: the mirrored replication jobs of the sources, running ones with their progress and
those finished in the last 24 hours (every job with `?all=1`), as `replicore jobs list`
shows them. The page reloads itself every few seconds while a job runs."""

from __future__ import annotations

import time

from quart import request

from .. import runtime
from ..store import jobs as job_store
from .web import bp, page

#: Finished jobs younger than this are listed (as `replicore jobs list` does).
RECENT_SECONDS = 24 * 3600.0
#: Seconds between reloads of the page while a job runs.
REFRESH_SECONDS = 5


@bp.get("/jobs")
async def jobs() -> str:
    everything = request.args.get("all") == "1"
    found = await runtime.current().db.read(
        job_store.list_jobs, time.time(), everything=everything, recent=RECENT_SECONDS
    )
    running = [j for j in found if j["state"] == "running"]
    return await page(
        "jobs.html",
        title="Jobs",
        refresh=REFRESH_SECONDS if running else None,
        running=running,
        finished=[j for j in found if j["state"] != "running"],
        everything=everything,
    )
