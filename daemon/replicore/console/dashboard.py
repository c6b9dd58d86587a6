"""The dashboard: repositories (used, free, quota, deduplication), paired sources, agents,
running jobs, pending requests, and the warnings an operator should act on."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import apsw
from quart import url_for

from .. import metrics, runtime
from ..config import ConsoleConfig
from ..store import cores, inventory, jobs, overview, recycle_bin, repositories, verify
from .formatting import size, when
from .web import bp, page

DAY = 86400.0
#: Finished jobs this recent count as "recent" on the dashboard (failed ones are warned of).
RECENT_JOBS = DAY
#: Seconds the deduplication figures of the repositories are reused.
REDUCTION_TTL = 60.0
_REDUCTION_KEY = "console.reduction"


def gather(
    conn: apsw.Connection,
    state_dir: Path,
    database_path: Path,
    config: ConsoleConfig,
    now: float,
    reduction: dict[int, dict[str, int]],
) -> dict[str, Any]:
    """Everything the dashboard shows (but the deduplication figures, `reduction`), read in
    one snapshot."""
    facts = metrics.read_facts(conn, state_dir, database_path)
    ids = {r["name"]: r["id"] for r in repositories.list_all(conn)}
    repos = []
    for repo in facts.repositories:
        figures = reduction.get(ids.get(repo.name, -1), {})
        logical, unique = figures.get("logical_bytes", 0), figures.get("unique_bytes", 0)
        stored = figures.get("stored_bytes", 0)
        repos.append(
            {
                "name": repo.name,
                "used": repo.used_bytes,
                "quota": repo.quota_bytes,
                "free": repo.free_bytes,
                "percent": 100.0 * repo.used_bytes / repo.quota_bytes if repo.quota_bytes else None,
                "logical": logical,
                "dedup": logical / unique if unique else None,
                "compression": unique / stored if stored else None,
            }
        )
    heard = overview.last_heard(conn)
    paired = cores.masters(conn)
    for source in paired:
        source["lastHeard"] = heard.get(source["requestId"])
    recent = jobs.list_jobs(conn, now, recent=RECENT_JOBS)
    pending_agents = [
        a
        for a in inventory.find_agents(conn)
        if a["state"] == "pending" and a["source_state"] == "approved"
    ]
    damaged = verify.damaged_images(conn)
    orphaned = overview.orphaned_images(conn)
    last_verify = verify.last_runs(conn, 1)
    bin_entries = recycle_bin.entries(conn, 0)
    data = {
        "repositories": repos,
        "disk_free": facts.disk_free_bytes,
        "disk_size": facts.disk_size_bytes,
        "database_bytes": facts.database_bytes,
        "paired": paired,
        "running": [j for j in recent if j["state"] == "running"],
        "failed": [j for j in recent if j["state"] == "failed"],
        "pending": facts.pending_requests,
        "pending_agents": pending_agents,
        "agent_counts": overview.agent_counts(conn),
        "sessions_open": facts.counts.get("sessions_open"),
        "damaged": damaged,
        "orphaned": orphaned,
        "last_verify": last_verify[0] if last_verify else None,
        "bin_count": len(bin_entries),
    }
    data["warnings"] = warnings(data, config, now)
    return data


def warnings(data: dict[str, Any], config: ConsoleConfig, now: float) -> list[dict[str, str]]:
    """(level, text, link endpoint) of what needs the operator's eye, worst first."""
    found: list[dict[str, str]] = []

    def add(level: str, text: str, endpoint: str) -> None:
        found.append({"level": level, "text": text, "endpoint": endpoint})

    limit = config.quota_warning_percent
    for repo in data["repositories"]:
        if repo["percent"] is not None and repo["percent"] >= limit:
            add(
                "error" if repo["percent"] >= 100 else "warning",
                f"Repository {repo['name']} is {repo['percent']:.0f}% full"
                f" ({size(repo['used'])} of its {size(repo['quota'])} quota).",
                "console.dashboard",
            )
    if data["disk_size"]:
        used = 100.0 * (1 - data["disk_free"] / data["disk_size"])
        if used >= limit:
            add(
                "error" if data["disk_free"] == 0 else "warning",
                f"The disk holding the database is {used:.0f}% full"
                f" ({size(data['disk_free'])} free).",
                "console.dashboard",
            )
    if data["damaged"]:
        add(
            "error",
            f"{len(data['damaged'])} volume image(s) are damaged: verify found corrupt or"
            " missing records. They heal when their source pushes them again.",
            "console.agents",
        )
    run = data["last_verify"]
    if run is not None and (run["corrupt_records"] or run["missing_records"]):
        add(
            "error",
            f"The last verify run ({when(run['finished_at'])}) found"
            f" {run['corrupt_records']} corrupt and {run['missing_records']} missing records.",
            "console.agents",
        )
    silent_after = config.silent_source_days * DAY
    for source in data["paired"]:
        heard = source["lastHeard"]
        if heard is None or now - heard >= silent_after:
            name = source["masterCoreInfo"]["hostName"] or source["masterCoreInfo"]["id"]
            since = "never" if heard is None else f"for {(now - heard) / DAY:.0f} days"
            add(
                "warning",
                f"Source {name} has not been heard from {since}"
                f" (warning after {config.silent_source_days:g} days).",
                "console.sources",
            )
    if data["orphaned"]:
        agents = sorted({o["agentId"] for o in data["orphaned"]})
        add(
            "warning",
            f"{len(data['orphaned'])} volume image(s) of {', '.join(agents)} are orphaned:"
            " an epoch they build on is not here (a seed drive or a new base repairs them).",
            "console.agents",
        )
    for job in data["failed"]:
        add(
            "warning",
            f"Job {job['id']} of {job['source']['hostName'] or job['source']['coreId']}"
            f" failed: {job['errorDetails'] or 'no details'}.",
            "console.jobs",
        )
    if data["pending"]:
        add(
            "info",
            f"{len(data['pending'])} pairing request(s) wait for a decision.",
            "console.pairing",
        )
    if data["pending_agents"]:
        add(
            "info",
            f"{len(data['pending_agents'])} agent(s) added by paired sources wait for approval.",
            "console.agents",
        )
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(found, key=lambda w: order[w["level"]])


async def reduction_figures(rt: runtime.Runtime, now: float) -> dict[int, dict[str, int]]:
    """`overview.repository_reduction`, computed at most once per REDUCTION_TTL seconds: it
    reads every block map, and the dashboard reloads itself while jobs run."""
    cached = rt.extras.get(_REDUCTION_KEY)
    if cached is not None and now - cached[0] < REDUCTION_TTL:
        figures: dict[int, dict[str, int]] = cached[1]
        return figures
    figures = await rt.db.read(overview.repository_reduction)
    rt.extras[_REDUCTION_KEY] = (now, figures)
    return figures


@bp.get("/")
async def dashboard() -> str:
    rt = runtime.current()
    now = time.time()
    reduction = await reduction_figures(rt, now)
    data = await rt.db.read(
        gather,
        rt.config.server.state_dir,
        rt.config.database_path,
        rt.config.console,
        now,
        reduction,
    )
    for warning in data["warnings"]:
        warning["href"] = url_for(warning.pop("endpoint"))
    return await page(
        "dashboard.html",
        title="Dashboard",
        refresh=10 if data["running"] else None,
        **data,
    )
