"""The daemon's periodic tasks (session expiry, job and upload sweeps, housekeeping, the
scheduled verify, the console's usage sampler).

Each runs in the server's nursery under its own cancel scope: started when the app starts
serving, cancelled when it stops, so nothing runs that the shutdown path does not know about.
A failed round is logged and the next one runs. The interval is read again before each
round, so a reload that changes it takes effect.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from quart import Blueprint, current_app

from . import runtime
from .runtime import Runtime

log = logging.getLogger("replicore.background")

Sweep = Callable[[Runtime], Awaitable[Any]]


def sweep_interval(timeout: float) -> float:
    """How often to look for things idle longer than `timeout`: a quarter of it, at most a
    minute."""
    return min(60.0, max(0.05, timeout / 4))


def periodic(bp: Blueprint, name: str, sweep: Sweep, interval: Callable[[Runtime], float]) -> None:
    """Run `sweep(rt)` every `interval(rt)` seconds while the app serves."""

    async def start() -> None:
        launch(name, sweep, interval)

    async def stop() -> None:
        cancel(name)

    bp.before_app_serving(start)
    bp.after_app_serving(stop)


def launch(name: str, sweep: Sweep, interval: Callable[[Runtime], float]) -> None:
    """Start the loop now: in the server's nursery (`runtime.nursery`, set by `serve`), else
    in quart-trio's app nursery."""
    rt = runtime.current()
    scope = trio.CancelScope()
    rt.extras[f"background.{name}"] = scope

    async def loop() -> None:
        with scope:
            while True:
                await trio.sleep(interval(rt))
                try:
                    await sweep(rt)
                except Exception:
                    log.exception("background task %s failed", name)

    nursery = rt.nursery or current_app.nursery  # type: ignore[attr-defined]
    nursery.start_soon(loop)


def cancel(name: str) -> None:
    scope = runtime.current().extras.pop(f"background.{name}", None)
    if scope is not None:
        scope.cancel()
