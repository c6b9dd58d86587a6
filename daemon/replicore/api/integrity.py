"""The daemon's side of integrity: the scheduled verify of stored records (`[verify]
interval_hours`, the same run as `replicore verify`, see store/verify.py).

No routes: a blueprint only for its serving hooks. The verify loop is a periodic task
(background.py, in the server's nursery): it wakes every few minutes and runs a
verify when the last scheduled run (kept in `verify_runs`, so a restart does not reset the
clock) is older than the interval; the interval is read from the running config each time,
so a reload changes it. A run goes through `runtime.db` step by step (reads on the reader
pool, writes serialised with the data path's), so stopping the daemon cancels it between
steps and never inside a transaction.
"""

from __future__ import annotations

import logging
import time

from quart import Blueprint

from .. import background, runtime
from ..store import steps, verify

log = logging.getLogger("replicore.verify")

bp = Blueprint("integrity", __name__)

#: Longest sleep of the verify loop between checks of whether a run is due.
MAX_TICK = 300.0
MIN_TICK = 0.2


def _last_scheduled(conn: object) -> float | None:
    found = conn.execute(  # type: ignore[attr-defined]
        "SELECT max(finished_at) FROM verify_runs WHERE origin = 'schedule'"
    ).fetchone()
    return None if found is None or found[0] is None else float(found[0])


async def verify_if_due(rt: runtime.Runtime) -> verify.Report | None:
    """Run a scheduled verify when `verify.interval_hours` have passed since the last one
    (or since the daemon started, for the first); returns its report, None if not due."""
    hours = rt.config.verify.interval_hours
    if hours <= 0:
        return None
    last = await rt.db.read(_last_scheduled)
    since = last if last is not None else rt.started_at
    if time.time() < since + hours * 3600:
        return None
    report = await steps.run_in(rt.db, verify.plan(verify.Scope(), origin="schedule"))
    summary = (
        f"verify: {report.records_checked} records checked in"
        f" {report.finished_at - report.started_at:.1f} s; {len(report.corrupt)} corrupt"
        f" ({report.records_forgotten} forgotten), {len(report.missing)} missing,"
        f" {len(report.damaged_images)} damaged image(s)"
    )
    data = {
        "data": {
            "records_checked": report.records_checked,
            "corrupt_records": len(report.corrupt),
            "missing_records": len(report.missing),
            "records_forgotten": report.records_forgotten,
            "damaged_images": [image["volumeImage"] for image in report.damaged_images],
        }
    }
    if report.clean:
        log.info(summary, extra=data)
    else:
        log.warning(summary, extra=data)
    return report


def tick(hours: float) -> float:
    """How often the loop checks whether a run is due."""
    if hours <= 0:
        return MAX_TICK
    return min(MAX_TICK, max(MIN_TICK, hours * 3600 / 10))


background.periodic(bp, "verify", verify_if_due, lambda rt: tick(rt.config.verify.interval_hours))
