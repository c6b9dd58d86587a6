"""`replicore gc [--dry-run] [--json]`: collect garbage records and give the space back.

Deletes the records no volume image (live or in the recycle bin) and no open session uses and
that are older than `replication.session_timeout`, then vacuums the freed pages away and
truncates the WAL, so the database file shrinks. Safe while the daemon runs (store/gc.py).
`--dry-run` reports what would be freed and changes nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..store import audit, gc
from .common import add_config_option, database, format_size, load_config, print_json


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "gc",
        help="delete unreferenced records and shrink the database file",
        description="Collect garbage records (see `replicore bin purge` for deleted agents)"
        " and give the freed space back to the file system.",
    )
    p.add_argument("--dry-run", action="store_true", help="report only; change nothing")
    p.add_argument("--json", action="store_true")
    add_config_option(p)
    p.set_defaults(handler=run)


def print_report(report: gc.Report) -> None:
    verb = "would free" if report.dry_run else "freed"
    print(
        f"{verb} {report.deleted_records} of {report.records_before} records:"
        f" {format_size(report.freed_stored_bytes)} stored"
        f" ({format_size(report.freed_raw_bytes)} uncompressed)"
    )
    if report.kept_young_or_pinned:
        print(
            f"kept {report.kept_young_or_pinned} unreferenced records: younger than the session"
            " timeout or announced by an open session"
        )
    if not report.dry_run:
        print(
            f"database on disk: {format_size(report.file_bytes_before)} ->"
            f" {format_size(report.file_bytes_after)}"
            f" ({report.vacuumed_pages} pages given back) in {report.seconds:.1f} s"
        )


def collect(args: argparse.Namespace, dry_run: bool) -> gc.Report:
    config = load_config(args)
    with database(args) as conn:
        report = gc.collect(
            conn,
            config.database_path,
            min_age=config.replication.session_timeout,
            dry_run=dry_run,
        )
        if not dry_run:
            audit.command_done(conn, "gc.run", deletedRecords=report.deleted_records)
        return report


def run(args: argparse.Namespace) -> int:
    report = collect(args, args.dry_run)
    if args.json:
        print_json(report.as_dict())
    else:
        print_report(report)
    return 0
