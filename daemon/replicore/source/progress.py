"""Counters of a push, and their display on a terminal.

`Counters` is updated from every thread of a push (reader, negotiation, senders) and read for
the final report.  `Display` redraws one status line on stderr a few times a second while the
push runs: bytes read, sent, deduplicated, the rate and an estimate of the time left.  It is
only started when stderr is a terminal.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

from .transport import WireCounter

MIB = 1024 * 1024


class Counters:
    """Thread-safe running totals of one push (all volumes)."""

    def __init__(self, total_bytes: int) -> None:
        self._lock = threading.Lock()
        self.total_bytes = total_bytes
        self.started = time.monotonic()
        self.bytes_read = 0  # image bytes hashed
        self.missing_bytes = 0  # raw bytes of the records the target lacks, to send
        self.raw_bytes_sent = 0  # raw bytes of the records the target accepted
        self.bytes_sent = 0  # stored (compressed) bytes of those records
        self.records_sent = 0
        self.volume = ""

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, value in amounts.items():
                setattr(self, name, getattr(self, name) + value)

    @property
    def deduplicated(self) -> int:
        """Bytes read that did not have to travel (the target had them, or they repeat)."""
        return max(0, self.bytes_read - self.missing_bytes)


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f} MiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Display:
    """Redraws a status line on a terminal until stopped."""

    def __init__(
        self, counters: Counters, wire: WireCounter, out: TextIO, interval: float = 0.25
    ) -> None:
        self.counters, self.wire, self.out, self.interval = counters, wire, out, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="push-progress", daemon=True)
        self._width = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._draw()
        self.out.write("\n")
        self.out.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def line(self) -> str:
        c = self.counters
        elapsed = max(1e-6, time.monotonic() - c.started)
        done = c.bytes_read + c.raw_bytes_sent
        todo = max(0, c.total_bytes - c.bytes_read) + max(0, c.missing_bytes - c.raw_bytes_sent)
        rate = c.bytes_read / elapsed
        eta = _duration(todo * elapsed / done) if done else "?"
        volume = f"{c.volume}: " if c.volume else ""
        return (
            f"{volume}read {_mib(c.bytes_read)} of {_mib(c.total_bytes)}, "
            f"sent {_mib(c.raw_bytes_sent)} ({_mib(c.bytes_sent)} compressed, "
            f"{c.records_sent} records), deduplicated {_mib(c.deduplicated)}, "
            f"{rate / MIB:,.0f} MiB/s, wire {_mib(self.wire.total)}, ETA {eta}"
        )

    def _draw(self) -> None:
        text = self.line()
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.out.write("\r" + text + " " * pad)
        self.out.flush()
