"""The usage sampler: while the console is enabled, the daemon records the bytes each source
stores every `console.usage_sample_interval` seconds (store/usage_history.py; a reload keeps
the running interval), the first one interval after start (the billing page adds the value
of the moment itself). It lives in the server's nursery under its own cancel scope, like the
housekeeping loop; the measure runs on a reader, the few rows it writes on the writer."""

from __future__ import annotations

import logging
import time

from .. import background, runtime
from ..store import usage_history
from .web import bp

log = logging.getLogger("replicore.console")


async def sample_once(rt: runtime.Runtime) -> int:
    """Measure and record one sample now; the rows written."""
    measured = await rt.db.read(usage_history.measure)
    return await rt.db.write(usage_history.record, measured, time.time())


background.periodic(
    bp, "usage-sampler", sample_once, lambda rt: rt.config.console.usage_sample_interval
)
