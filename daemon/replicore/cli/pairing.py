"""`replicore pairing list|approve|deny|ignore`: the operator's side of pairing by request.

These work on the daemon's SQLite file while it runs; approving needs no change to the live
TLS trust store, which holds the certificate since the request came in.
"""

from __future__ import annotations

import argparse
import getpass
import time
from typing import Any

from ..store import audit, cores
from ..store.db import transaction
from .common import CommandError, add_config_option, database, load_config, print_json, print_table


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "pairing", help="list, approve, deny or ignore pairing requests"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)

    p = group.add_parser("list", help="confirmed pairing requests awaiting a decision")
    p.add_argument("--all", action="store_true", help="every source on record, in any state")
    p.add_argument("--json", action="store_true")
    add_config_option(p)
    p.set_defaults(handler=list_)

    p = group.add_parser("approve", help="approve a pairing request")
    p.add_argument("request_id", type=int, metavar="REQUEST_ID")
    p.add_argument(
        "--repository",
        metavar="NAME",
        help="existing repository for its agents (default: a new one of the source's own)",
    )
    p.add_argument(
        "--agent-repository",
        action="append",
        default=[],
        metavar="AGENT=NAME",
        type=_agent_repository,
        help="put one agent in another existing repository (repeatable)",
    )
    p.add_argument("--customer-id", metavar="ID")
    p.add_argument("--email", metavar="ADDR")
    p.add_argument("--comment", metavar="TEXT")
    add_config_option(p)
    p.set_defaults(handler=approve)

    p = group.add_parser("deny", help="deny a pairing request (the source is told the reason)")
    p.add_argument("request_id", type=int, metavar="REQUEST_ID")
    p.add_argument("--reason", default="", metavar="TEXT")
    add_config_option(p)
    p.set_defaults(handler=deny)

    p = group.add_parser("ignore", help="drop a pairing request without an answer")
    p.add_argument("request_id", type=int, metavar="REQUEST_ID")
    add_config_option(p)
    p.set_defaults(handler=ignore)


def _agent_repository(text: str) -> tuple[str, str]:
    agent, sep, name = text.partition("=")
    if not sep or not agent or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not AGENT=NAME")
    return agent, name


def _operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def list_(args: argparse.Namespace) -> int:
    config = load_config(args)
    with database(args) as conn:
        with transaction(conn):
            cores.purge_expired(conn, time.time(), config.pairing.unconfirmed_ttl)
        found = cores.list_requests(conn, include_all=args.all)
        described = [cores.describe_master(conn, core) for core in found]
    if args.json:
        print_json(described)
        return 0
    table = [
        {
            "id": d["requestId"],
            "state": d["state"],
            "core id": d["masterCoreInfo"]["id"],
            "host": d["masterCoreInfo"]["hostName"],
            "fingerprint": d["fingerprint"],
            "agents": ",".join(a["agentInfo"]["id"] for a in d["agents"]) or "-",
            "customer id": d["customerId"],
            "email": d["emailAddress"],
            "comment": d["comments"],
        }
        for d in described
    ]
    columns = ["id", "core id", "host", "fingerprint", "agents", "customer id", "email", "comment"]
    if args.all:
        columns.insert(1, "state")
    print_table(table, columns)
    return 0


def approve(args: argparse.Namespace) -> int:
    per_agent = dict(args.agent_repository)
    if len(per_agent) != len(args.agent_repository):
        raise CommandError("--agent-repository names an agent twice")
    with database(args) as conn, transaction(conn):
        core = cores.approve(
            conn,
            args.request_id,
            repository=args.repository,
            agent_repositories=per_agent,
            customer_id=args.customer_id,
            email=args.email,
            comment=args.comment,
            decided_by=_operator(),
            now=time.time(),
        )
        described = cores.describe_master(conn, core)
        audit.record(
            conn,
            audit.cli_actor(),
            "pairing.approve",
            f"request {args.request_id}",
            details={
                "coreId": core["core_id"],
                "agents": {a["agentInfo"]["id"]: a["repositoryName"] for a in described["agents"]},
            },
        )
    print(f"approved request {args.request_id} (source {core['core_id']}, {core['host_name']})")
    for agent in described["agents"]:
        print(f"  agent {agent['agentInfo']['id']}: {agent['state']} -> {agent['repositoryName']}")
    return 0


def deny(args: argparse.Namespace) -> int:
    with database(args) as conn, transaction(conn):
        core = cores.deny(
            conn, args.request_id, reason=args.reason, decided_by=_operator(), now=time.time()
        )
        audit.record(
            conn,
            audit.cli_actor(),
            "pairing.deny",
            f"request {args.request_id}",
            details={"coreId": core["core_id"], "reason": args.reason},
        )
    print(f"denied request {args.request_id} (source {core['core_id']}, {core['host_name']})")
    return 0


def ignore(args: argparse.Namespace) -> int:
    with database(args) as conn, transaction(conn):
        cores.ignore(conn, args.request_id)
        audit.record(conn, audit.cli_actor(), "pairing.ignore", f"request {args.request_id}")
    print(f"dropped request {args.request_id}")
    return 0
