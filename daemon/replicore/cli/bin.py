"""`replicore bin list|show|restore|purge`: the recycle bin, where what sources delete waits
`recycle_bin.retention_days` before it is purged (store/recycle_bin.py).

`restore ENTRY` puts an agent and its recovery points back (exports are exact again);
`purge ENTRY...` (or `--expired`, `--all`) deletes entries for good and then collects
garbage so the space comes back (`--no-gc` to leave that to `replicore gc` or the daemon).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..store import audit, recycle_bin
from ..store.db import transaction
from . import gc as gc_command
from .agents import when
from .common import (
    CommandError,
    add_config_option,
    database,
    format_size,
    load_config,
    print_json,
    print_table,
)


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "bin", help="the recycle bin: list, show, restore or purge deleted agents"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)

    p = group.add_parser("list", help="entries of the recycle bin, oldest first")
    p.add_argument("--json", action="store_true")
    add_config_option(p)
    p.set_defaults(handler=list_)

    p = group.add_parser("show", help="one entry with its recovery points")
    p.add_argument("entry", type=int, metavar="ENTRY")
    p.add_argument("--json", action="store_true")
    add_config_option(p)
    p.set_defaults(handler=show)

    p = group.add_parser("restore", help="put an entry's agent and recovery points back")
    p.add_argument("entry", type=int, metavar="ENTRY")
    add_config_option(p)
    p.set_defaults(handler=restore)

    p = group.add_parser("purge", help="delete entries for good, then collect garbage")
    p.add_argument("entries", type=int, nargs="*", metavar="ENTRY")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--expired", action="store_true", help="the entries whose time is up")
    which.add_argument("--all", action="store_true", help="every entry")
    p.add_argument("--no-gc", action="store_true", help="do not collect garbage afterwards")
    add_config_option(p)
    p.set_defaults(handler=purge)


def _keep_for(args: argparse.Namespace) -> float:
    return load_config(args).recycle_bin.retention_days * recycle_bin.DAY


def list_(args: argparse.Namespace) -> int:
    keep_for = _keep_for(args)
    with database(args) as conn:
        conn.execute("BEGIN")
        try:
            found = recycle_bin.entries(conn, keep_for, with_bytes=True)
        finally:
            conn.execute("COMMIT")
    if args.json:
        print_json(found)
        return 0
    print_table(
        [
            {
                "entry": e["id"],
                "source": e["sourceCoreId"],
                "agent": e["agentId"],
                "rps": e["recoveryPointCount"],
                "deleted": when(e["deletedAt"]),
                "by": e["deletedBy"] or e["reason"],
                "expires": when(e["expiresAt"]),
                "frees": format_size(e["freedBytes"]),
            }
            for e in found
        ],
        ["entry", "source", "agent", "rps", "deleted", "by", "expires", "frees"],
    )
    return 0


def show(args: argparse.Namespace) -> int:
    keep_for = _keep_for(args)
    with database(args) as conn:
        conn.execute("BEGIN")
        try:
            entry = recycle_bin.describe(conn, args.entry, keep_for)
        finally:
            conn.execute("COMMIT")
    if args.json:
        print_json(entry)
        return 0
    print(
        f"entry {entry['id']}: agent {entry['agentId']} of source {entry['sourceCoreId']},"
        f" deleted {when(entry['deletedAt'])} by {entry['deletedBy'] or entry['reason']},"
        f" expires {when(entry['expiresAt'])}; purging frees {format_size(entry['freedBytes'])}"
    )
    print_table(
        [
            {"recovery point": p["recovery_point_id"], "timestamp": p["timestamp"]}
            for p in entry["recoveryPoints"]
        ],
        ["recovery point", "timestamp"],
    )
    return 0


def restore(args: argparse.Namespace) -> int:
    with database(args) as conn, transaction(conn):
        done = recycle_bin.restore(conn, args.entry, time.time())
        audit.command(conn, "bin.restore", f"entry {args.entry}", agentId=done["agentId"])
    into = " into the agent the source added again" if done["mergedIntoLiveAgent"] else ""
    print(
        f"restored agent {done['agentId']} of source {done['sourceCoreId']} with"
        f" {done['recoveryPointCount']} recovery points{into}"
    )
    return 0


def purge(args: argparse.Namespace) -> int:
    if not (args.entries or args.expired or args.all):
        raise CommandError("name the entries to purge, or use --expired or --all")
    if args.entries and (args.expired or args.all):
        raise CommandError("name entries or use --expired / --all, not both")
    keep_for = _keep_for(args)
    purged: list[dict[str, Any]] = []
    with database(args) as conn, transaction(conn):
        now = time.time()
        if args.all:
            ids = [e["id"] for e in recycle_bin.entries(conn, keep_for)]
        elif args.expired:
            ids = recycle_bin.expired(conn, now, keep_for)
        else:
            ids = list(dict.fromkeys(args.entries))
            for entry_id in ids:
                recycle_bin.get(conn, entry_id)  # all or nothing: NotFound names the entry
        for entry_id in ids:
            purged.append(recycle_bin.purge(conn, entry_id, now))
        audit.command(conn, "bin.purge", ",".join(map(str, ids)) or "-", entries=len(ids))
    for done in purged:
        print(
            f"purged entry {done['entryId']}: agent {done['agentId']} of source"
            f" {done['sourceCoreId']} ({done['recoveryPointCount']} recovery points)"
        )
    if not purged:
        print("nothing to purge")
    elif not args.no_gc:
        gc_command.print_report(gc_command.collect(args, dry_run=False))
    return 0
