"""The usage sampler: while the console is enabled, the daemon records the bytes each source
stores every `console.usage_sample_interval` seconds (store/usage_history.py; a reload keeps
the running interval), the first one interval after start (the billing page adds the value
of the moment itself). It lives in the server's nursery under its own cancel scope, like the
housekeeping loop; the measure runs on a reader, the few rows it writes on the writer."""

from __future__ import annotations

import logging
import time

import trio

from .. import runtime
from ..store import usage_history
from .web import bp

log = logging.getLogger("replicore.console")

SCOPE_KEY = "console.sampler.scope"


async def sample_once(rt: runtime.Runtime) -> int:
    """Measure and record one sample now; the rows written."""
    measured = await rt.db.read(usage_history.measure)
    return await rt.db.write(usage_history.record, measured, time.time())


async def _loop(rt: runtime.Runtime, scope: trio.CancelScope) -> None:
    with scope:
        while True:
            await trio.sleep(rt.config.console.usage_sample_interval)
            try:
                await sample_once(rt)
            except Exception:
                log.exception("console: usage sample failed")


@bp.before_app_serving
async def _start() -> None:
    rt = runtime.current()
    if rt.nursery is None:
        return
    scope = trio.CancelScope()
    rt.extras[SCOPE_KEY] = scope
    rt.nursery.start_soon(_loop, rt, scope)


@bp.after_app_serving
async def _stop() -> None:
    scope = runtime.current().extras.pop(SCOPE_KEY, None)
    if scope is not None:
        scope.cancel()
