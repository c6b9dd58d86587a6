"""What a running daemon holds for its request handlers: config, database, trust store, limits.

Handlers reach it with `runtime.current()`; the app factory puts it in place.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import current_app

from .config import Config
from .server import TrustStore
from .store.db import Database


class RateLimiter:
    """At most `limit` events per `window` seconds per key (a sliding window, in memory)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._events: dict[str, deque[float]] = defaultdict(deque)

    def _prune(self, key: str, now: float) -> deque[float]:
        events = self._events[key]
        while events and events[0] <= now - self.window:
            events.popleft()
        return events

    def blocked(self, key: str) -> bool:
        return len(self._prune(key, time.monotonic())) >= self.limit

    def record(self, key: str) -> None:
        self._prune(key, time.monotonic()).append(time.monotonic())

    def allow(self, key: str) -> bool:
        """Record one event for key unless the limit is reached; True when recorded."""
        if self.blocked(key):
            return False
        self.record(key)
        return True

    def retry_after(self, key: str) -> int:
        events = self._prune(key, time.monotonic())
        if not events:
            return 0
        return max(1, int(events[0] + self.window - time.monotonic()) + 1)


@dataclass
class Runtime:
    config: Config
    db: Database
    trust: TrustStore
    core_id: str
    server_fingerprint: str
    started_at: float = field(default_factory=time.time)
    #: The server's nursery for background work (commits, expiry); set by `serve`.
    nursery: trio.Nursery | None = None
    limiters: dict[str, RateLimiter] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def limiter(self, name: str, limit: int, window: float) -> RateLimiter:
        if name not in self.limiters:
            self.limiters[name] = RateLimiter(limit, window)
        return self.limiters[name]


def current() -> Runtime:
    runtime: Runtime = current_app.extensions["replicore"]
    return runtime
