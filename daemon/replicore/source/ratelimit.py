"""A token bucket that caps the bytes a push sends per second, shared by all its connections.

The bucket is small (a tenth of a second of the rate, or one piece when that is bigger), so the
sender never bursts above the limit for longer than that.  A caller that asks for more than is
available reserves it anyway and sleeps off the debt, so large pieces and many threads are
served in order without starving one another (the "virtual scheduling" form of the bucket).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: Fraction of one second of the rate the bucket may hold.
BURST_SECONDS = 0.1


class TokenBucket:
    """At most ``rate`` bytes per second on average, bursts of at most ``capacity`` bytes."""

    def __init__(
        self,
        rate: float,
        *,
        capacity: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.capacity = float(capacity if capacity is not None else rate * BURST_SECONDS)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        # Start empty: the first second already carries the connection set-up.
        self._tokens = 0.0
        self._stamp = clock()

    @property
    def piece_size(self) -> int:
        """The largest piece a sender should pass at once to stay within the burst bound."""
        return max(1024, min(256 * 1024, int(self.capacity)))

    def acquire(self, amount: int) -> None:
        """Take ``amount`` tokens, sleeping as long as needed to stay within the rate."""
        if amount <= 0:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= amount
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
