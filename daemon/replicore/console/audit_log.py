"""Audit log: who did what to this core, when, from where, and how it ended (store/audit.py),
newest first, filtered by kind of action and period, as `replicore audit` shows it."""

from __future__ import annotations

import time

from quart import request

from .. import runtime
from ..store import audit
from .web import bp, page

#: Rows shown at most (the newest).
LIMIT = 300
PERIODS = (("1d", "Last 24 hours", 86400.0), ("7d", "Last 7 days", 7 * 86400.0),
           ("30d", "Last 30 days", 30 * 86400.0), ("all", "Everything", None))  # fmt: skip
KINDS = (
    ("", "All actions"),
    ("admin.", "Logins and administrators"),
    ("pairing.", "Pairing decisions"),
    ("source.", "Sources"),
    ("agent.", "Agents"),
    ("bin.", "Recycle bin"),
    ("repository.", "Repositories"),
)


@bp.get("/audit")
async def audit_log() -> str:
    period = request.args.get("period", "7d")
    seconds = next((s for key, _, s in PERIODS if key == period), 7 * 86400.0)
    kind = request.args.get("action", "")
    if kind not in {k for k, _ in KINDS}:
        kind = ""
    since = None if seconds is None else time.time() - seconds
    entries = await runtime.current().db.read(audit.entries, since, None, kind or None, LIMIT + 1)
    entries.reverse()
    return await page(
        "audit.html",
        title="Audit log",
        entries=entries[:LIMIT],
        truncated=len(entries) > LIMIT,
        limit=LIMIT,
        periods=PERIODS,
        period=period,
        kinds=KINDS,
        kind=kind,
    )
