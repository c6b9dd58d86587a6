"""`replicore audit [--since WHEN] [--until WHEN] [--action NAME] [--limit N] [--json]`: the
audit log (store/audit.py), oldest first.

WHEN is a time before now (`90s`, `30m`, `12h`, `7d`, `2w`) or an ISO 8601 date or date and
time (`2026-11-27`, `2026-11-27T10:00`, `2026-11-27T10:00:00Z`); one without an offset is
local time, as `journalctl --since` takes it. The table shows local times; `--json` gives
UTC times.
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import UTC, datetime
from typing import Any

from ..store import audit
from .common import CommandError, add_config_option, database, print_json, print_table

_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """A WHEN argument as epoch seconds."""
    now = time.time() if now is None else now
    ago = _AGO.match(text)
    if ago:
        return now - float(ago.group(1)) * _UNIT_SECONDS[ago.group(2).lower()]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a time ago like 30m, 12h, 7d nor an ISO 8601 date or time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time
    return moment.timestamp()


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "audit",
        help="show the audit log (operator actions, administrator logins)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--since", type=parse_when, metavar="WHEN", help="from this time on")
    p.add_argument("--until", type=parse_when, metavar="WHEN", help="before this time")
    p.add_argument(
        "--action",
        metavar="NAME",
        help="only this action (e.g. admin.login), or a prefix ending in '.' (pairing.)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="only the newest N entries")
    p.add_argument("--json", action="store_true", help="one JSON array, times in UTC")
    add_config_option(p)
    p.set_defaults(handler=show)


def _iso_utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def show(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise CommandError("--limit must be at least 1")
    with database(args) as conn:
        found = audit.entries(conn, args.since, args.until, args.action, args.limit)
    if args.json:
        print_json(
            [
                {
                    "id": e["id"],
                    "at": _iso_utc(e["at"]),
                    "actor": e["actor"],
                    "action": e["action"],
                    "outcome": e["outcome"],
                    "target": e["target"],
                    "clientAddress": e["client_address"],
                    "details": e["details"],
                }
                for e in found
            ]
        )
        return 0
    table = [
        {
            "time": datetime.fromtimestamp(e["at"]).astimezone().isoformat(timespec="seconds"),
            "actor": e["actor"],
            "action": e["action"],
            "outcome": e["outcome"],
            "target": e["target"] or "-",
            "from": e["client_address"] or "-",
            "details": " ".join(f"{k}={v}" for k, v in e["details"].items()) or "-",
        }
        for e in found
    ]
    print_table(table, ["time", "actor", "action", "outcome", "target", "from", "details"])
    return 0
