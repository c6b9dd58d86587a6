"""`replicore jobs list [--all] [--json]`: the mirrored jobs of the sources, running and recent,
with their progress."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from typing import Any

from ..store import jobs
from .common import add_config_option, database, format_size, print_json, print_table

#: Finished jobs younger than this are "recent" (shown without --all).
RECENT_SECONDS = 24 * 3600.0


def register(subparsers: Any) -> None:
    group = subparsers.add_parser("jobs", help="mirrored replication jobs").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = group.add_parser("list", help="running jobs and those finished in the last 24 hours")
    p.add_argument("--all", action="store_true", help="every job ever mirrored")
    p.add_argument("--json", action="store_true")
    add_config_option(p)
    p.set_defaults(handler=list_)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _bytes(job: dict[str, Any]) -> str:
    done = format_size(job["bytesTransferred"])
    return f"{done} / {format_size(job['bytesTotal'])}" if job["bytesTotal"] is not None else done


def _line(job: dict[str, Any], label: str, agents: str, source: str) -> dict[str, str]:
    return {
        "job": label,
        "source": source,
        "kind": job["kind"],
        "agents": agents,
        "state": job["state"],
        "phase": job["phase"] or "-",
        "progress": f"{job['progress']:.1f}%",
        "bytes": _bytes(job),
        "started": _when(job["startedAt"]),
        "last_sync": _when(job["lastSyncAt"]),
        "error": job["errorDetails"],
    }


def list_(args: argparse.Namespace) -> int:
    with database(args) as conn:
        found = jobs.list_jobs(conn, time.time(), everything=args.all, recent=RECENT_SECONDS)
    if args.json:
        print_json(found)
        return 0
    lines = []
    for job in found:
        source = job["source"]["hostName"] or job["source"]["coreId"]
        agents = ",".join(a["id"] for a in job["agents"])
        lines.append(_line(job, job["id"], agents, source))
        for child in job["transferJobs"]:
            lines.append(_line(child, "  - transfer", child["agentId"], source))
        for update in job["metadataUpdates"]:
            if job["kind"] == "replication":
                lines.append(
                    {
                        "job": "  - metadata",
                        "source": source,
                        "kind": "metadata",
                        "agents": update["agentId"],
                        "state": update["state"],
                        "started": _when(update["startedAt"]),
                    }
                )
    print_table(
        lines,
        [
            "job",
            "source",
            "kind",
            "agents",
            "state",
            "phase",
            "progress",
            "bytes",
            "started",
            "last_sync",
            "error",
        ],
    )
    return 0
