"""`replicore verify`: re-read and re-hash the stored records, report the corrupt and the
missing ones, mark the volume images they damage, and forget corrupt records so that the
next push sends them again (see store/verify.py).

Runs on the target against its database, while the daemon runs or not: it reads in short
snapshots and writes in short transactions. Exit status 0 when everything in scope is whole,
1 when something is damaged (corrupt or missing records found now, or images still marked
from an earlier run), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

import apsw

from ..store import audit, verify
from ..store.db import rows
from .common import CommandError, add_config_option, database, format_size


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify",
        help="re-hash stored records; mark damaged images, forget corrupt records",
        description="Decompress and re-hash every stored record (or those of one agent or "
        "source) and check that every block of every volume image has its record. Corrupt "
        "records are forgotten, so the next push of the image sends them again; the images "
        "that need them are marked damaged until then. Exit status 1 when anything in scope "
        "is damaged.",
    )
    p.add_argument("--agent", metavar="ID", help="only the records of this agent's images")
    p.add_argument(
        "--source", metavar="CORE_ID", help="only this source's agents (or pick the --agent)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="report only: forget nothing, mark nothing",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_config_option(p)
    p.set_defaults(handler=run_verify)


def resolve_scope(conn: apsw.Connection, agent_id: str | None, source: str | None) -> verify.Scope:
    """The agents a run covers: all (no option), a source's, or one agent."""
    if agent_id is None and source is None:
        return verify.Scope()
    sql = (
        "SELECT a.id, a.agent_id, c.core_id FROM agents a JOIN master_cores c"
        " ON c.id = a.core_pk WHERE 1 = 1"
    )
    args: list[Any] = []
    if agent_id is not None:
        sql += " AND a.agent_id = ?"
        args.append(agent_id)
    if source is not None:
        sql += " AND c.core_id = ?"
        args.append(source)
    found = rows(conn, sql + " ORDER BY c.core_id", args)
    if not found:
        if agent_id is None:
            raise CommandError(f"no source {source!r} with agents on this core")
        of = f" of source {source}" if source else ""
        raise CommandError(f"no agent {agent_id!r}{of} on this core")
    if agent_id is not None:
        if len(found) > 1:
            cores = ", ".join(a["core_id"] for a in found)
            raise CommandError(
                f"sources {cores} each have an agent {agent_id!r}: choose with --source"
            )
        label = f"agent {agent_id} of source {found[0]['core_id']}"
    else:
        label = f"source {source}"
    return verify.Scope(tuple(a["id"] for a in found), label)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def print_report(report: verify.Report) -> None:
    seconds = report.finished_at - report.started_at
    print(
        f"verified {report.records_checked} records ({format_size(report.bytes_checked)}"
        f" uncompressed) of {report.scope} in {seconds:.1f} s"
        + (" (dry run: nothing changed)" if report.dry_run else "")
    )
    for title, findings in (("corrupt", report.corrupt), ("missing", report.missing)):
        if not findings:
            print(f"{title} records: none")
            continue
        print(f"{title} records: {len(findings)}")
        for finding in findings:
            action = " (forgotten)" if finding.forgotten else ""
            print(f"  repository {finding.repository} key {finding.key}: {finding.detail}{action}")
            for block in finding.blocks:
                print(
                    f"    agent {block['agentId']} (source {block['sourceCoreId']}) volume image"
                    f" {block['volumeImage']} block {block['blockIndex']}"
                )
    if not report.damaged_images:
        print("damaged images: none")
    else:
        print(f"damaged images: {len(report.damaged_images)}")
        for image in report.damaged_images:
            print(
                f"  agent {image['agentId']} (source {image['sourceCoreId']}) volume image"
                f" {image['volumeImage']}: {image['damagedBlocks']} block(s) {image['reasons']}"
                f" since {_when(image['foundAt'])}"
            )
        print(
            "a push of the agent's volumes sends the forgotten or missing records again and"
            " clears these marks"
        )
    print("clean" if report.clean else "DAMAGED")


def run_verify(args: argparse.Namespace) -> int:
    with database(args) as conn:
        scope = resolve_scope(conn, args.agent, args.source)
        report = verify.run(conn, verify.plan(scope, dry_run=args.dry_run))
        if not args.dry_run:
            audit.command_done(conn, "verify.run", str(args.agent or "all"), clean=report.clean)
    if args.json:
        print(json.dumps(report.as_json(), separators=(",", ":")))
    else:
        print_report(report)
    return 0 if report.clean else 1
