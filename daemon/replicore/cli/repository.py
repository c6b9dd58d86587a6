"""`replicore repository create|list|quota`: storage partitions and their quotas."""

from __future__ import annotations

import argparse
from typing import Any

from ..store import audit, repositories
from ..store.db import transaction
from .common import add_config_option, database, format_size, parse_size, print_json, print_table


def register(subparsers: Any) -> None:
    group = subparsers.add_parser("repository", help="manage repositories").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = group.add_parser("create", help="create a repository")
    p.add_argument("name")
    p.add_argument("--quota", type=parse_size, metavar="SIZE", help="e.g. 500G, 2TiB")
    add_config_option(p)
    p.set_defaults(handler=create)

    p = group.add_parser("list", help="list repositories with usage")
    p.add_argument("--json", action="store_true")
    add_config_option(p)
    p.set_defaults(handler=list_)

    p = group.add_parser("quota", help="set or clear a repository's quota")
    p.add_argument("name")
    p.add_argument("size", help="SIZE, or 'none' to clear")
    add_config_option(p)
    p.set_defaults(handler=quota)


def create(args: argparse.Namespace) -> int:
    with database(args) as conn, transaction(conn):
        repositories.create(conn, args.name, args.quota)
        audit.record(
            conn,
            audit.cli_actor(),
            "repository.create",
            args.name,
            details={"quotaBytes": args.quota},
        )
    print(f"created repository {args.name}")
    return 0


def list_(args: argparse.Namespace) -> int:
    with database(args) as conn:
        found = repositories.list_all(conn)
    if args.json:
        print_json(found)
        return 0
    for repo in found:
        repo["quota"] = format_size(repo["quota_bytes"])
        repo["used"] = format_size(repo["used_bytes"])
    print_table(found, ["name", "quota", "used"])
    return 0


def quota(args: argparse.Namespace) -> int:
    size = None if args.size.lower() == "none" else parse_size(args.size)
    with database(args) as conn, transaction(conn):
        repositories.set_quota(conn, args.name, size)
        audit.record(
            conn, audit.cli_actor(), "repository.quota", args.name, details={"quotaBytes": size}
        )
    print(f"quota of {args.name}: {format_size(size) if size is not None else 'none'}")
    return 0
