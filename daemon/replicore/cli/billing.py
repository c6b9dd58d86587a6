"""`replicore billing report [--month YYYY-MM] [--format csv|json|table]`: per source core
(and customer id) and agent, the bytes protected as the source reported them (time-weighted
average and peak over the month), the bytes stored here (unique and shared) and the recovery
points. See store/billing.py for how each figure is made."""

from __future__ import annotations

import argparse
import csv
import sys
import time
from datetime import UTC, datetime
from typing import Any

from ..store import billing
from .common import CommandError, add_config_option, database, format_size, print_json, print_table

CSV_COLUMNS = [
    ("month", "month"),
    ("core_id", "coreId"),
    ("customer_id", "customerId"),
    ("source_host", "sourceHost"),
    ("agent_id", "agentId"),
    ("display_name", "displayName"),
    ("host_name", "hostName"),
    ("replicated_here", "replicatedHere"),
    ("protected_bytes_average", "protectedBytesAverage"),
    ("protected_bytes_peak", "protectedBytesPeak"),
    ("protected_bytes_latest", "protectedBytesLatest"),
    ("reports_in_month", "reportsInMonth"),
    ("stored_unique_bytes", "storedUniqueBytes"),
    ("stored_shared_bytes", "storedSharedBytes"),
    ("stored_bytes", "storedBytes"),
    ("recovery_points", "recoveryPoints"),
    ("reported_recovery_points", "reportedRecoveryPoints"),
]


def register(subparsers: Any) -> None:
    group = subparsers.add_parser("billing", help="usage for MSP billing").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = group.add_parser("report", help="usage per source and agent over a month")
    p.add_argument("--month", metavar="YYYY-MM", help="the month (default: this month, UTC)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    add_config_option(p)
    p.set_defaults(handler=report)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")[:-6] + "Z"


def flat_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (source, agent), with the source's columns repeated."""
    flat = []
    for source in result["sources"]:
        for agent in source["agents"]:
            flat.append(
                {
                    **agent,
                    "month": result["month"],
                    "coreId": source["coreId"],
                    "customerId": source["customerId"],
                    "sourceHost": source["hostName"],
                }
            )
    return flat


def report(args: argparse.Namespace) -> int:
    now = time.time()
    month = args.month or billing.current_month(now)
    with database(args) as conn:
        try:
            result = billing.report(conn, month, now)
        except ValueError as error:
            raise CommandError(f"--month: {error}") from None
    if args.format == "json":
        print_json(
            {
                **result,
                "from": _iso(result["from"]),
                "to": _iso(result["to"]),
                "generatedAt": _iso(result["generatedAt"]),
            }
        )
        return 0
    rows = flat_rows(result)
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([name for name, _ in CSV_COLUMNS])
        for r in rows:
            writer.writerow(["" if r[key] is None else r[key] for _, key in CSV_COLUMNS])
        return 0
    print(f"Billing report for {month} ({_iso(result['from'])} to {_iso(result['to'])})")
    print_table(
        [
            {
                "customer": r["customerId"] or "-",
                "source": r["sourceHost"] or r["coreId"],
                "agent": r["agentId"],
                "protected_avg": format_size(r["protectedBytesAverage"]),
                "protected_peak": format_size(r["protectedBytesPeak"]),
                "stored_unique": format_size(r["storedUniqueBytes"]),
                "stored_shared": format_size(r["storedSharedBytes"]),
                "recovery_points": r["recoveryPoints"],
            }
            for r in rows
        ],
        [
            "customer",
            "source",
            "agent",
            "protected_avg",
            "protected_peak",
            "stored_unique",
            "stored_shared",
            "recovery_points",
        ],
    )
    for repository in result["repositories"]:
        if repository["unattributedBytes"]:
            print(
                f"repository {repository['name']}: {format_size(repository['unattributedBytes'])}"
                " held by no committed image (open sessions or garbage)"
            )
    return 0
