"""`replicore admin add|remove|list`: administrator accounts for HTTP Basic endpoints."""

from __future__ import annotations

import argparse
from typing import Any

from ..store import admins, audit
from ..store.db import transaction
from .common import add_config_option, database, print_table, read_password


def register(subparsers: Any) -> None:
    group = subparsers.add_parser("admin", help="manage administrator accounts").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = group.add_parser("add", help="add an administrator")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add_config_option(p)
    p.set_defaults(handler=add)

    p = group.add_parser("remove", help="remove an administrator")
    p.add_argument("name")
    add_config_option(p)
    p.set_defaults(handler=remove)

    p = group.add_parser("list", help="list administrators")
    add_config_option(p)
    p.set_defaults(handler=list_)


def add(args: argparse.Namespace) -> int:
    password = read_password(args.password_stdin, confirm=True)
    with database(args) as conn, transaction(conn):
        admins.add(conn, args.name, password)
        audit.record(conn, audit.cli_actor(), "admin.add", args.name)
    print(f"added administrator {args.name}")
    return 0


def remove(args: argparse.Namespace) -> int:
    with database(args) as conn, transaction(conn):
        admins.remove(conn, args.name)
        audit.record(conn, audit.cli_actor(), "admin.remove", args.name)
    print(f"removed administrator {args.name}")
    return 0


def list_(args: argparse.Namespace) -> int:
    with database(args) as conn:
        print_table(admins.list_all(conn), ["name"])
    return 0
