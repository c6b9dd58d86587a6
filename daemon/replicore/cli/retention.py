"""`replicore retention show|set|apply`: target-side retention policies (store/retention.py).

A policy keeps every recovery point younger than `--keep-all`, then the newest one of each
of the last `--hourly` hours, `--daily` days, `--weekly` weeks and `--monthly` months that
have one. The default policy applies to every agent without its own; with no policy at all
everything is kept. `apply` rolls up what the policies no longer keep (the daemon also does
it every `recycle_bin.sweep_interval`), then collects garbage.
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import UTC, datetime
from typing import Any

from ..store import audit, inventory, retention
from ..store.db import rows, transaction
from . import gc as gc_command
from .agents import operator_name
from .common import CommandError, add_config_option, database, print_json, print_table

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90s', '15m', '36h', '3d', '2w' or plain seconds -> seconds."""
    found = _DURATION.match(text.lower())
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 36h, 3d or 2w")
    return float(found.group(1)) * _UNITS[found.group(2)]


def parse_moment(text: str) -> datetime:
    """An ISO 8601 time (UTC when it has no offset)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > retention.MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count 0..{retention.MAX_COUNT}")
    return int(text)


def _target(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--agent", metavar="ID", help="an agent (default: every agent)")
    p.add_argument("--source", metavar="CORE_ID", help="the source's core id (with --agent)")
    if required:
        p.add_argument("--default", action="store_true", help="the default policy")


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "retention", help="target-side retention policies: show, set, apply"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)

    p = group.add_parser("show", help="policies; with --agent, what each recovery point gets")
    _target(p, required=False)
    p.add_argument("--at", type=parse_moment, metavar="TIME", help="plan as of TIME (ISO 8601)")
    p.add_argument("--json", action="store_true")
    add_config_option(p)
    p.set_defaults(handler=show)

    p = group.add_parser("set", help="set the default policy or an agent's own")
    _target(p, required=True)
    p.add_argument("--keep-all", type=parse_duration, metavar="DURATION", help="e.g. 3d, 36h")
    for name in ("hourly", "daily", "weekly", "monthly"):
        p.add_argument(f"--{name}", type=_count, metavar="N")
    p.add_argument("--off", action="store_true", help="keep everything (no retention)")
    p.add_argument(
        "--inherit", action="store_true", help="drop the agent's own policy (use the default)"
    )
    add_config_option(p)
    p.set_defaults(handler=set_)

    p = group.add_parser("apply", help="roll up what the policies no longer keep, then gc")
    _target(p, required=False)
    p.add_argument("--at", type=parse_moment, metavar="TIME", help="as of TIME (ISO 8601)")
    p.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
    p.add_argument("--no-gc", action="store_true", help="do not collect garbage afterwards")
    p.add_argument("--json", action="store_true")
    add_config_option(p)
    p.set_defaults(handler=apply)


def _describe(policy: retention.Policy) -> str:
    if not policy.enabled:
        return "keep everything"
    parts = [f"keep all for {policy.keep_all_seconds / 3600:g}h"]
    for name in ("hourly", "daily", "weekly", "monthly"):
        value = getattr(policy, name)
        if value:
            parts.append(f"{name} {value}")
    return ", ".join(parts)


def show(args: argparse.Namespace) -> int:
    moment = args.at or retention.utc_now()
    with database(args) as conn:
        conn.execute("BEGIN")
        try:
            default = retention.default_policy(conn)
            if args.agent is None:
                overrides = []
                for r in rows(
                    conn,
                    "SELECT p.*, a.agent_id, c.core_id FROM retention_policies p"
                    " JOIN agents a ON a.id = p.agent_pk JOIN master_cores c ON c.id = a.core_pk"
                    " ORDER BY c.core_id, a.agent_id",
                ):
                    own = retention.agent_override(conn, r["agent_pk"])
                    assert own is not None
                    overrides.append((r["core_id"], r["agent_id"], own))
                answer: dict[str, Any] = {
                    "default": default.describe(),
                    "agents": [
                        {"sourceCoreId": c, "agentId": a, "policy": p.describe()}
                        for c, a, p in overrides
                    ],
                }
            else:
                agent = inventory.one_agent(conn, args.agent, args.source)
                policy, origin = retention.effective_policy(conn, agent["id"])
                points, decisions, _ = retention.agent_plan(conn, agent["id"], moment)
                answer = {
                    "agentId": agent["agent_id"],
                    "sourceCoreId": agent["source_core_id"],
                    "policy": policy.describe(),
                    "from": origin,
                    "at": retention.iso(moment),
                    "recoveryPoints": [
                        {
                            "id": point.recovery_point_id,
                            "timestamp": retention.iso(point.moment),
                            "keep": decisions[point.pk].keep,
                            "reasons": decisions[point.pk].reasons,
                        }
                        for point in points
                    ],
                }
        finally:
            conn.execute("COMMIT")
    if args.json:
        print_json(answer)
        return 0
    if args.agent is None:
        print(f"default: {_describe(default)}")
        for core_id, agent_id, policy in overrides:
            print(f"agent {agent_id} of source {core_id}: {_describe(policy)}")
        return 0
    print(
        f"agent {answer['agentId']} of source {answer['sourceCoreId']}:"
        f" {_describe(policy)} ({answer['from']} policy), as of {answer['at']}"
    )
    print_table(
        [
            {
                "recovery point": p["id"],
                "timestamp": p["timestamp"],
                "decision": "keep" if p["keep"] else "roll up",
                "why": ", ".join(p["reasons"]) or "-",
            }
            for p in answer["recoveryPoints"]
        ],
        ["recovery point", "timestamp", "decision", "why"],
    )
    return 0


def set_(args: argparse.Namespace) -> int:
    if args.default == (args.agent is not None):
        raise CommandError("say which policy: --default or --agent ID")
    counts = {n: getattr(args, n) for n in ("hourly", "daily", "weekly", "monthly")}
    given = args.keep_all is not None or any(v is not None for v in counts.values())
    if args.inherit and (args.default or given or args.off):
        raise CommandError("--inherit only goes with --agent, alone")
    if args.off and given:
        raise CommandError("--off keeps everything; it takes no other setting")
    if not (given or args.off or args.inherit):
        raise CommandError("nothing to set: give --keep-all, --hourly ... or --off")
    with database(args) as conn, transaction(conn):
        agent = None
        if args.agent is not None:
            agent = inventory.one_agent(conn, args.agent, args.source)
        if args.inherit:
            assert agent is not None
            retention.clear_override(conn, agent["id"])
            policy = retention.default_policy(conn)
        else:
            if agent is None:
                current = retention.default_policy(conn)
            else:
                current = retention.effective_policy(conn, agent["id"])[0]
            if args.off:
                policy = retention.Policy(
                    enabled=False,
                    keep_all_seconds=current.keep_all_seconds,
                    hourly=current.hourly,
                    daily=current.daily,
                    weekly=current.weekly,
                    monthly=current.monthly,
                )
            else:
                policy = retention.Policy(
                    enabled=True,
                    keep_all_seconds=(
                        args.keep_all if args.keep_all is not None else current.keep_all_seconds
                    ),
                    **{n: (v if v is not None else getattr(current, n)) for n, v in counts.items()},
                )
            retention.set_policy(
                conn, None if agent is None else agent["id"], policy, time.time(), operator_name()
            )
        target = "default" if agent is None else f"agent {agent['agent_id']}"
        audit.command(conn, "retention.set", target, inherit=args.inherit, enabled=policy.enabled)
    if agent is None:
        print(f"default policy: {_describe(policy)}")
    else:
        origin = "the default" if args.inherit else "its own"
        print(
            f"agent {agent['agent_id']} of source {agent['source_core_id']} follows {origin}"
            f" policy: {_describe(policy)}"
        )
    return 0


def apply(args: argparse.Namespace) -> int:
    moment = args.at or retention.utc_now()
    with database(args) as conn:
        with transaction(conn):
            if args.agent is not None:
                agent = inventory.one_agent(conn, args.agent, args.source)
                targets = [int(agent["id"])]
            else:
                targets = retention.agents_with_policies(conn)
            names = {
                r["id"]: (r["agent_id"], r["core_id"])
                for r in rows(
                    conn,
                    "SELECT a.id, a.agent_id, c.core_id FROM agents a"
                    " JOIN master_cores c ON c.id = a.core_pk",
                )
            }
        done = retention.apply_sync(conn, targets, moment, dry_run=args.dry_run)
        if not args.dry_run:
            audit.command_done(
                conn, "retention.apply", f"{len(targets)} agents", rolledUp=len(done)
            )
    if args.json:
        print_json(done)
    else:
        verb = "would roll up" if args.dry_run else "rolled up"
        for item in done:
            agent_id, core_id = names.get(item["agentPk"], ("?", "?"))
            print(
                f"{verb} recovery point {item['recoveryPointId']} ({item['timestamp']}) of agent"
                f" {agent_id} of source {core_id}"
            )
        if not done:
            print("nothing to roll up")
    if done and not args.dry_run and not args.no_gc:
        report = gc_command.collect(args, dry_run=False)
        if not args.json:
            gc_command.print_report(report)
    return 0
