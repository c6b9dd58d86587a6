"""systemd's notification protocol (sd_notify) with the standard library only.

A message is one datagram of `KEY=VALUE` lines to the unix socket named by `$NOTIFY_SOCKET`
(a path, or an abstract socket written with a leading '@'). The daemon sends READY=1 once it
listens, STATUS= lines on what it is doing, WATCHDOG=1 at half the watchdog interval when
systemd asks for pings (`$WATCHDOG_USEC`), RELOADING=1/READY=1 around a reload and
STOPPING=1 when it begins to stop. Without `$NOTIFY_SOCKET` every call does nothing.

The one-file executable runs as two processes: the bootloader (systemd's main PID, which
forwards signals) and the Python child that sends the messages. The unit therefore says
`NotifyAccess=all`, and `$WATCHDOG_PID` (the PID systemd expects pings from: the bootloader)
is accepted when it names this process or, in a frozen executable, its parent.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Mapping

import trio

log = logging.getLogger("replicore.notify")


class Notifier:
    """Sends notifications to systemd; every method is a no-op outside systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None, frozen: bool | None = None):
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_usec = _watchdog_usec(
            env, frozen=getattr(sys, "frozen", False) if frozen is None else frozen
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked."""
        if self.address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, *lines: str) -> bool:
        """Send one datagram of the given `KEY=VALUE` lines; True when it was sent."""
        if self.address is None:
            return False
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block the event loop on a listener that does not read.
                sock.setblocking(False)
                sock.sendto(payload, self.address)
        except BlockingIOError:
            log.warning("systemd's notify socket %r is full; message dropped", self.address)
            return False
        except OSError as error:
            log.warning("cannot notify systemd at %r: %s", self.address, error)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([_status(status)] if status else []))

    def status(self, text: str) -> bool:
        return self.send(_status(text))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 match the reload with its request.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([_status(status)] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """Ping at half the watchdog interval while the trio loop is alive; returns at once
        when systemd asked for no pings."""
        interval = self.watchdog_interval
        if interval is None:
            return
        log.debug("sending watchdog pings every %.3f s", interval)
        while True:
            self.watchdog()
            await trio.sleep(interval)


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    log.warning("ignoring NOTIFY_SOCKET=%r: only unix socket paths are supported", value)
    return None


def _watchdog_usec(env: Mapping[str, str], frozen: bool) -> int | None:
    text = env.get("WATCHDOG_USEC", "")
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    if pid_text:
        if not (pid_text.isascii() and pid_text.isdigit()):
            return None
        accepted = {os.getpid(), *([os.getppid()] if frozen else [])}
        if int(pid_text) not in accepted:
            return None  # meant for another process
    return int(text)
