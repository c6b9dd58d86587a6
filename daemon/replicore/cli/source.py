"""`replicore source init|pair|status`: the source side's identity and its pairing with targets.

The identity directory is `--dir DIR` (before or after the action), else
`$REPLICORE_SOURCE_DIR`, else `~/.config/replicore-source`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import httpx

from ..source import identity as identity_module
from ..source import pairing
from ..source.connection import PinError
from .common import CommandError, print_json, read_password


def add_dir_option(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        # The group's --dir and the action's share `dir`: the action's must not overwrite it.
        default=None if top else argparse.SUPPRESS,
        help="source identity directory (default: $REPLICORE_SOURCE_DIR, then "
        "~/.config/replicore-source)",
    )


def register(subparsers: Any) -> None:
    top = subparsers.add_parser("source", help="the source side: identity and pairing")
    add_dir_option(top, top=True)
    group = top.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = group.add_parser("init", help="make this source's key and client certificate")
    add_dir_option(p)
    p.set_defaults(handler=init)

    p = group.add_parser("pair", help="pair with a target, by request or by demand")
    p.add_argument("--target", required=True, metavar="https://HOST:PORT")
    p.add_argument(
        "--fingerprint",
        required=True,
        metavar="SHA256",
        help="the target's certificate fingerprint (`replicore fingerprint` on the target)",
    )
    p.add_argument("--agent", action="append", required=True, metavar="ID", dest="agents")
    p.add_argument("--customer-id", default="", metavar="ID")
    p.add_argument("--email", default="", metavar="ADDR")
    p.add_argument("--comment", default="", metavar="TEXT")
    p.add_argument(
        "--demand", action="store_true", help="pair at once with administrator credentials"
    )
    p.add_argument("--user", metavar="NAME", help="the target's administrator (with --demand)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add_dir_option(p)
    p.set_defaults(handler=pair)

    p = group.add_parser("status", help="the pairing state with a target")
    p.add_argument("--target", metavar="URL", help="needed when paired with several targets")
    p.add_argument("--json", action="store_true")
    add_dir_option(p)
    p.set_defaults(handler=status)


def init(args: argparse.Namespace) -> int:
    source = identity_module.init(args.dir)
    print(f"source identity in {source.directory}")
    print(f"core id: {source.core_id}")
    print(f"certificate SHA-256: {source.fingerprint}")
    return 0


def _agent_lines(answer: dict[str, Any]) -> list[str]:
    lines = []
    for agent in answer.get("agents", []):
        where = f" -> repository {agent['repositoryName']}" if agent.get("repositoryName") else ""
        lines.append(f"  agent {agent['agentInfo']['id']}: {agent['state']}{where}")
    return lines


def pair(args: argparse.Namespace) -> int:
    credentials = None
    if args.demand:
        if not args.user:
            raise CommandError("--demand needs --user NAME (an administrator of the target)")
        credentials = (args.user, read_password(args.password_stdin, "Target password: "))
    elif args.user or args.password_stdin:
        raise CommandError("--user and --password-stdin go with --demand")
    try:
        source = identity_module.init(args.dir)
        answer = pairing.pair(
            source,
            args.target,
            args.fingerprint,
            args.agents,
            customer_id=args.customer_id,
            email=args.email,
            comment=args.comment,
            demand_credentials=credentials,
        )
    except (PinError, pairing.PairingError, identity_module.IdentityError, ValueError) as error:
        raise CommandError(str(error)) from None
    except httpx.HTTPError as error:
        raise CommandError(f"cannot reach {args.target}: {error}") from None
    if answer["pairingState"] == "approved":
        print(f"paired with {args.target} (core {answer['coreId']})")
    else:
        print(
            f"pairing request {answer['requestId']} sent to {args.target} "
            f"(core {answer['coreId']}): {answer['pairingState']}, awaiting the operator"
        )
    for line in _agent_lines(answer):
        print(line)
    return 0


def status(args: argparse.Namespace) -> int:
    try:
        source = identity_module.load(args.dir)
        answer = pairing.sync(source, args.target)
    except (pairing.PairingError, identity_module.IdentityError) as error:
        print(f"replicore: {error}", file=sys.stderr)
        return 1
    except httpx.HTTPError as error:
        raise CommandError(f"cannot reach the target: {error}") from None
    if args.json:
        print_json(answer)
        return 0
    print(f"target {answer['targetUrl']} (core {answer['coreId']}): {answer['state']}")
    if answer.get("errorDetails"):
        print(f"reason: {answer['errorDetails']}")
    if answer.get("isReplicationPaused"):
        print("replication is paused")
    for line in _agent_lines(answer):
        print(line)
    return 0
