"""The daemon's housekeeping: every `recycle_bin.sweep_interval` seconds it purges the bin
entries whose `retention_days` are up, applies the retention policies (one transaction per
rolled-up recovery point), and, when either deleted something, collects garbage and gives
the freed pages back to the file system.

No routes: a blueprint only for its serving hooks. The loop lives in the server's nursery
(`runtime.nursery`) under its own cancel scope, like the data path's session expiry; one
pass runs at a time (`collect_garbage` and `sweep_once` share a lock). Each step goes through
`runtime.db` (writes serialised with the data path's), the truncating WAL checkpoints
between vacuum steps too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio
from quart import Blueprint

from .. import background, runtime
from ..store import gc, recycle_bin, retention, steps

log = logging.getLogger("replicore.housekeeping")

bp = Blueprint("housekeeping", __name__)

LOCK_KEY = "inventory.housekeeping.lock"
#: The shortest pause between passes, whatever the config says.
MIN_INTERVAL = 0.2


def _lock(rt: runtime.Runtime) -> trio.Lock:
    lock: trio.Lock = rt.extras.setdefault(LOCK_KEY, trio.Lock())
    return lock


async def collect_garbage(rt: runtime.Runtime, *, dry_run: bool = False) -> gc.Report:
    """A garbage collection through the daemon's database runner (see store/gc.py)."""
    async with _lock(rt):
        return await _collect(rt, dry_run)


async def _collect(rt: runtime.Runtime, dry_run: bool) -> gc.Report:
    min_age = rt.config.replication.session_timeout
    return await steps.run_in(rt.db, gc.steps(rt.db.path, min_age=min_age, dry_run=dry_run))


async def apply_retention(rt: runtime.Runtime) -> list[dict[str, Any]]:
    """Apply every enabled retention policy now; the recovery points rolled up."""
    moment = retention.utc_now()
    done: list[dict[str, Any]] = []
    for agent_pk in await rt.db.read(retention.agents_with_policies):
        points, decisions, _ = await rt.db.read(retention.agent_plan, agent_pk, moment)
        for point in points:
            if decisions[point.pk].keep:
                continue
            result = await rt.db.write(
                retention.delete_if_still_planned, agent_pk, point.pk, moment
            )
            if result is not None:
                done.append({"agentPk": agent_pk, **result})
    return done


async def sweep_once(rt: runtime.Runtime) -> dict[str, Any]:
    """One housekeeping pass: bin purge, retention, then garbage collection if needed."""
    async with _lock(rt):
        now = time.time()
        keep_for = rt.config.recycle_bin.retention_days * recycle_bin.DAY
        purged = await rt.db.write(recycle_bin.purge_expired, now, keep_for)
        for entry_id in purged:
            log.info("recycle bin entry %s purged: its time was up", entry_id)
        rolled = await apply_retention(rt)
        for item in rolled:
            log.info(
                "retention rolled up recovery point %s (%s)",
                item["recoveryPointId"],
                ", ".join(item["volumeImages"]),
            )
        report = None
        if purged or rolled:
            report = await _collect(rt, dry_run=False)
            log.info(
                "garbage collection freed %d records, %d bytes; file %d -> %d bytes",
                report.deleted_records,
                report.freed_stored_bytes,
                report.file_bytes_before,
                report.file_bytes_after,
            )
        await rt.db.write(recycle_bin.recount, None, now)
        return {
            "purged": purged,
            "rolledUp": rolled,
            "gc": report.as_dict() if report else None,
        }


background.periodic(
    bp,
    "housekeeping",
    sweep_once,
    lambda rt: max(MIN_INTERVAL, rt.config.recycle_bin.sweep_interval),
)
