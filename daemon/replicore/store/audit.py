"""The audit log: who did what to this core, when, from where, and how it ended.

One row per operator action (a `replicore` command that changes something: pairing
decisions, administrator accounts, repositories, ...) and per administrator login over the
API (HTTP Basic; successful, failed, and the first attempt refused by the rate limit in each
window). Rows are only ever added. A password is never recorded: `actor` is the name the
caller gave, `details` only what the caller of `record` puts there.

Commands write their row with `record(conn, ...)` inside the transaction of the action, so
the row exists exactly when the action happened; the daemon writes login rows through its
database writer (`Database.write(record, ...)`).
"""

from __future__ import annotations

import getpass
import json
import os
import time
from typing import Any

import apsw

from .db import rows, transaction

SCHEMA = """
CREATE TABLE audit_log (
    id             INTEGER PRIMARY KEY,
    at             REAL NOT NULL,
    actor          TEXT NOT NULL,
    action         TEXT NOT NULL,
    outcome        TEXT NOT NULL CHECK (outcome IN ('ok', 'failed', 'refused')),
    target         TEXT NOT NULL DEFAULT '',
    client_address TEXT NOT NULL DEFAULT '',
    details        TEXT NOT NULL DEFAULT '{}'
) STRICT;
CREATE INDEX audit_log_at ON audit_log(at);
"""

OUTCOMES = ("ok", "failed", "refused")
#: Longest actor, target or address kept (a name an attacker chose is cut, not refused).
MAX_TEXT = 256


def cli_actor() -> str:
    """Who runs this command: `cli:USER`, with the user who ran sudo when there is one."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    sudo = os.environ.get("SUDO_USER")
    return f"cli:{user}" + (f" (sudo by {sudo})" if sudo and sudo != user else "")


def record(
    conn: apsw.Connection,
    actor: str,
    action: str,
    target: str = "",
    *,
    outcome: str = "ok",
    client_address: str = "",
    details: dict[str, Any] | None = None,
    now: float | None = None,
) -> int:
    """Add one row; returns its id."""
    if outcome not in OUTCOMES:
        raise ValueError(f"audit outcome {outcome!r} is not one of {OUTCOMES}")
    conn.execute(
        "INSERT INTO audit_log(at, actor, action, outcome, target, client_address, details) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            time.time() if now is None else now,
            actor[:MAX_TEXT],
            action,
            outcome,
            str(target)[:MAX_TEXT],
            client_address[:MAX_TEXT],
            json.dumps(details or {}, sort_keys=True, default=str),
        ),
    )
    return conn.last_insert_rowid()


def command(conn: apsw.Connection, action: str, target: str = "", **details: Any) -> int:
    """The row of an operator command (actor `cli_actor()`), in the command's transaction."""
    return record(conn, cli_actor(), action, target, details=details)


def command_done(conn: apsw.Connection, action: str, target: str = "", **details: Any) -> int:
    """The same in a transaction of its own, for a command that ran its own transactions."""
    with transaction(conn):
        return command(conn, action, target, **details)


def entries(
    conn: apsw.Connection,
    since: float | None = None,
    until: float | None = None,
    action: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rows oldest first, from `since` (inclusive) to `until` (exclusive); `action` matches
    the action or, ending in '.', every action under that prefix; `limit` keeps the newest."""
    where, args = [], []
    if since is not None:
        where.append("at >= ?")
        args.append(since)
    if until is not None:
        where.append("at < ?")
        args.append(until)
    if action:
        if action.endswith("."):
            where.append("substr(action, 1, ?) = ?")
            args.extend([len(action), action])
        else:
            where.append("action = ?")
            args.append(action)
    sql = "SELECT * FROM audit_log" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY at DESC, id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    found = rows(conn, sql, args)
    found.reverse()
    for entry in found:
        entry["details"] = json.loads(entry["details"])
    return found
