"""`replicore agents list|pause|resume|delete|approve|deny`: the operator's view of every
source's agents.

An agent is named by its id, with `--source CORE_ID` when two sources have an agent of that
id. `pause` stops the data path from opening sessions for it (the source is told in
verifyStart); `delete` moves it with its recovery points to the recycle bin (`replicore
bin`); `approve` / `deny` decide on an agent a paired source added by request. They work on
the daemon's database while it runs.
"""

from __future__ import annotations

import argparse
import getpass
import time
from datetime import UTC, datetime
from typing import Any

import apsw

from ..store import audit, inventory, recycle_bin
from ..store.db import transaction
from .common import add_config_option, database, format_size, print_json, print_table


def operator_name() -> str:
    """Who runs the command, as recorded in the database (`cli:USER`)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def when(value: float | str | None) -> str:
    """A time for a table: epoch seconds or an ISO timestamp; '-' for none."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def add_agent_arguments(parser: argparse.ArgumentParser, flag: bool = False) -> None:
    """ID (or --agent ID when `flag`) and --source CORE_ID."""
    if flag:
        parser.add_argument("--agent", required=True, metavar="ID", help="the agent id")
    else:
        parser.add_argument("agent", metavar="ID", help="the agent id")
    parser.add_argument(
        "--source", metavar="CORE_ID", help="the source's core id (when two sources have ID)"
    )


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "agents", help="list, pause, resume, delete, approve or deny agents"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)

    p = group.add_parser("list", help="the agents of every source (or of one)")
    p.add_argument("--source", metavar="CORE_ID", help="only this source's agents")
    p.add_argument("--json", action="store_true")
    add_config_option(p)
    p.set_defaults(handler=list_)

    for name, help_text, handler in (
        ("pause", "stop replication of an agent (no new sessions)", pause),
        ("resume", "let an agent replicate again", resume),
        ("delete", "move an agent and its recovery points to the recycle bin", delete),
        ("deny", "deny an agent a paired source added by request", deny),
    ):
        p = group.add_parser(name, help=help_text)
        add_agent_arguments(p)
        add_config_option(p)
        p.set_defaults(handler=handler)

    p = group.add_parser("approve", help="approve an agent a paired source added by request")
    add_agent_arguments(p)
    p.add_argument(
        "--repository",
        metavar="NAME",
        help="existing repository (default: the one the source asked for, else its own)",
    )
    add_config_option(p)
    p.set_defaults(handler=approve)


def _summary(agent: dict[str, Any]) -> dict[str, Any]:
    paused = []
    if agent["paused"] or agent["core_paused"]:
        paused.append("operator")
    if agent["source_paused"]:
        paused.append("source")
    return {
        "source": agent["source_core_id"],
        "agent": agent["agent_id"],
        "name": agent["display_name"],
        "state": agent["state"],
        "repository": agent["repository_name"] or "-",
        "paused": ",".join(paused) or "-",
        "rps": agent["recovery_point_count"],
        "newest": when(agent["newest"]),
        "last job": (agent["last_job_state"] or "-")
        + (f" {agent['progress']:.0f}%" if agent["progress"] is not None else ""),
    }


def list_(args: argparse.Namespace) -> int:
    with database(args) as conn:
        conn.execute("BEGIN")
        try:
            found = inventory.find_agents(conn, source=args.source)
            for agent in found:
                agent["protected_bytes"] = inventory.protected_bytes(conn, agent["id"])
        finally:
            conn.execute("COMMIT")
    if args.json:
        print_json(found)
        return 0
    table = [{**_summary(a), "protected": format_size(a["protected_bytes"])} for a in found]
    print_table(
        table,
        [
            "source",
            "agent",
            "name",
            "state",
            "repository",
            "paused",
            "rps",
            "newest",
            "protected",
            "last job",
        ],
    )
    return 0


def _one(conn: apsw.Connection, args: argparse.Namespace) -> dict[str, Any]:
    return inventory.one_agent(conn, args.agent, args.source)


def _who(agent: dict[str, Any]) -> str:
    return f"agent {agent['agent_id']} of source {agent['source_core_id']}"


def _set_pause(args: argparse.Namespace, paused: bool) -> int:
    with database(args) as conn, transaction(conn):
        agent = _one(conn, args)
        inventory.set_operator_pause(conn, agent["id"], paused)
        audit.command(conn, "agent.pause" if paused else "agent.resume", _who(agent))
    word = "paused" if paused else "resumed"
    print(f"{word} agent {agent['agent_id']} of source {agent['source_core_id']}")
    return 0


def pause(args: argparse.Namespace) -> int:
    return _set_pause(args, True)


def resume(args: argparse.Namespace) -> int:
    return _set_pause(args, False)


def delete(args: argparse.Namespace) -> int:
    with database(args) as conn, transaction(conn):
        agent = _one(conn, args)
        done = recycle_bin.bin_agent(
            conn, agent["id"], reason="operator", deleted_by=operator_name(), now=time.time()
        )
        audit.command(conn, "agent.delete", _who(agent), binEntry=done["entryId"])
    what = f"agent {agent['agent_id']} of source {agent['source_core_id']}"
    if done["entryId"] is None:
        print(f"deleted {what} (it had no recovery points)")
    else:
        print(
            f"moved {what} with {done['recoveryPointCount']} recovery points to the recycle bin"
            f" (entry {done['entryId']}; `replicore bin restore {done['entryId']}` undoes it)"
        )
    return 0


def approve(args: argparse.Namespace) -> int:
    with database(args) as conn, transaction(conn):
        agent = _one(conn, args)
        done = inventory.approve_agent(conn, agent["id"], args.repository, time.time())
        audit.command(conn, "agent.approve", _who(agent), repository=done["repositoryName"])
    print(
        f"approved agent {done['agentId']} of source {agent['source_core_id']}"
        f" into repository {done['repositoryName']}"
    )
    return 0


def deny(args: argparse.Namespace) -> int:
    with database(args) as conn, transaction(conn):
        agent = _one(conn, args)
        inventory.deny_agent(conn, agent["id"])
        audit.command(conn, "agent.deny", _who(agent))
    print(f"denied agent {agent['agent_id']} of source {agent['source_core_id']}")
    return 0
