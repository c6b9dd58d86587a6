"""`replicore rps list --agent ID [--source CORE_ID]`: an agent's recovery points, newest first,
with their volume images and whether their chain is broken (orphaned)."""

from __future__ import annotations

import argparse
from typing import Any

from ..store import inventory
from .agents import add_agent_arguments
from .common import add_config_option, database, format_size, print_json, print_table


def register(subparsers: Any) -> None:
    group = subparsers.add_parser("rps", help="recovery points of an agent").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = group.add_parser("list", help="an agent's complete recovery points, newest first")
    add_agent_arguments(p, flag=True)
    p.add_argument("--json", action="store_true")
    add_config_option(p)
    p.set_defaults(handler=list_)


def list_(args: argparse.Namespace) -> int:
    with database(args) as conn:
        conn.execute("BEGIN")
        try:
            agent = inventory.one_agent(conn, args.agent, args.source)
            points = inventory.recovery_points(conn, agent["id"])
        finally:
            conn.execute("COMMIT")
    if args.json:
        print_json(points)
        return 0
    print(
        f"agent {agent['agent_id']} of source {agent['source_core_id']}:"
        f" {len(points)} recovery points"
    )
    print_table(
        [
            {
                "recovery point": p["id"],
                "timestamp": p["timestamp"],
                "volumes": " ".join(i["id"] for i in p["volumeImages"]),
                "size": format_size(p["sizeBytes"]),
                "orphaned": "yes" if p["isOrphaned"] else "no",
            }
            for p in points
        ],
        ["recovery point", "timestamp", "volumes", "size", "orphaned"],
    )
    return 0
