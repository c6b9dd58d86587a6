"""`replicore status [--json]`: what the target is doing, for an operator.

Two sources, each named in the output:
- the database (read directly, works with the daemon stopped): paired sources, pending
  pairing requests, repositories with used/quota/free bytes, disk and database size, and the
  live counts the store registers (open sessions, running jobs);
- the running daemon, through its control socket STATE_DIR/control.sock (see control.py):
  version, pid, uptime, API and metrics listen addresses, requests and record uploads in
  progress.
Exit status: 0 when the daemon answers, 3 when it does not (not running, or no permission
to its socket); the database part is shown either way.
"""

from __future__ import annotations

import argparse
import datetime
import time
from dataclasses import asdict
from typing import Any

from .. import control, metrics
from .common import add_config_option, database, format_size, load_config, print_json, print_table

NOT_RUNNING = 3


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status",
        help="show the daemon's state: sources, requests, sessions, repositories",
        description="Show version, uptime and listen addresses (from the running daemon, "
        "asked on STATE_DIR/control.sock) and paired sources, pending requests, open "
        "sessions, running jobs and repositories with used/free space (from the database). "
        "Exits 3 when the daemon does not answer; the database part is shown anyway.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_option(p)
    p.set_defaults(handler=run_status)


def run_status(args: argparse.Namespace) -> int:
    config = load_config(args)
    state_dir = config.server.state_dir
    with database(args) as conn:
        facts = metrics.read_facts(conn, state_dir, config.database_path)
    daemon: dict[str, Any] | None
    try:
        daemon = control.query(control.socket_path(state_dir))
        daemon_error = None if daemon.get("ok") else str(daemon.get("error"))
    except control.Unreachable as error:
        daemon, daemon_error = None, str(error)
    if args.json:
        print_json(
            {
                "daemon": daemon,
                "daemonError": daemon_error,
                "database": {**asdict(facts), "path": str(config.database_path.absolute())},
            }
        )
    else:
        _print_text(daemon, daemon_error, facts, config.database_path)
    return 0 if daemon is not None and daemon_error is None else NOT_RUNNING


def _print_text(
    daemon: dict[str, Any] | None, error: str | None, facts: metrics.Facts, db_path: Any
) -> None:
    print("Daemon (from its control socket):")
    if daemon is None or error:
        print(f"  not answering: {error}")
    else:
        print(
            f"  replicore {daemon['version']}, pid {daemon['pid']}, up "
            f"{_duration(daemon['uptimeSeconds'])}"
            + (", stopping" if daemon.get("stopping") else "")
        )
        for url in daemon["listen"]:
            print(f"  API:     {url}{daemon['urlPrefix']}")
        for url in daemon["metrics"]:
            print(f"  metrics: {url}")
        print(f"  server certificate SHA-256: {daemon['fingerprint']}")
        print(
            f"  requests in progress: {daemon['requestsInProgress']}, "
            f"record uploads in progress: {daemon['uploadsInProgress']}"
        )
    print()
    print(f"Database ({db_path}):")
    sessions = facts.counts.get("sessions_open")
    jobs = facts.counts.get("jobs_running")
    print(
        f"  sessions open: {'-' if sessions is None else sessions}, "
        f"jobs running: {'-' if jobs is None else jobs}"
    )
    print(
        f"  disk free: {format_size(facts.disk_free_bytes)} of "
        f"{format_size(facts.disk_size_bytes)}; database {format_size(facts.database_bytes)}"
    )
    print()
    print(f"Paired sources ({len(facts.paired_sources)}):")
    print_table(
        [
            {
                **source,
                "last_contact": _when(source["last_contact_at"]),
                "paused": "yes" if source["paused"] else "",
            }
            for source in facts.paired_sources
        ],
        ["core_id", "host_name", "customer_id", "agents", "repository", "last_contact", "paused"],
    )
    print()
    print(f"Pending pairing requests ({len(facts.pending_requests)}):")
    print_table(
        [{**r, "confirmed": _when(r["confirmed_at"])} for r in facts.pending_requests],
        ["id", "core_id", "host_name", "customer_id", "client_address", "confirmed"],
    )
    print()
    print(f"Repositories ({len(facts.repositories)}):")
    print_table(
        [
            {
                "name": repo.name,
                "used": format_size(repo.used_bytes),
                "quota": format_size(repo.quota_bytes),
                "free": format_size(repo.free_bytes),
            }
            for repo in facts.repositories
        ],
        ["name", "used", "quota", "free"],
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s"


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    ago = time.time() - timestamp
    return f"{moment:%Y-%m-%d %H:%M}Z ({_duration(ago)} ago)"
