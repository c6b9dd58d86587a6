"""Test helpers for operations: a metrics listener on a free port, scraping and reading
samples, a fake systemd notify socket, configs with custom [server] options, JSON log lines.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

#: Extra TOML for servers whose metrics a test reads: a free port, not the default 9106.
METRICS_TOML = '[metrics]\nlisten = "127.0.0.1:0"\n'


def write_server_config(server: Any, server_options: str = "", extra: str = "") -> None:
    """Rewrite a not-yet-started RunningServer's config with extra [server] options."""
    server.config_path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nstate_dir = "{server.state_dir}"\n'
        f"{server_options}\n{METRICS_TOML}{extra}"
    )


def daemon_info(server: Any) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((server.state_dir / "daemon.json").read_text())
    return info


def scrape(server: Any) -> str:
    url = daemon_info(server)["metrics"][0]
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted label pairs): value} of a scrape."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


class NotifySocket:
    """A fake $NOTIFY_SOCKET, read all the time by a thread (as systemd reads it: a unix
    datagram queue holds only a few messages), that also learns each sender's pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        #: (sender pid, {key: value}) in arrival order.
        self.received: list[tuple[int, dict[str, str]]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.received.append((pid, fields))

    @property
    def messages(self) -> list[dict[str, str]]:
        return [fields for _, fields in self.received]

    def wait_for(self, key: str, value: str = "1", timeout: float = 60.0) -> dict[str, str]:
        """The first message with key=value (waiting for it if need be)."""
        return self.received[self.wait_index(key, value, timeout)][1]

    def sender(self, key: str, value: str = "1", timeout: float = 60.0) -> int:
        """The pid that sent the first message with key=value."""
        return self.received[self.wait_index(key, value, timeout)][0]

    def wait_index(self, key: str, value: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, (_, fields) in enumerate(list(self.received)):
                if fields.get(key) == value:
                    return index
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value} in {self.messages}")

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()


def log_lines(server: Any) -> list[dict[str, Any]]:
    """Every line of the server's log, each parsed as JSON (fails on a line that is not)."""
    lines = []
    for number, line in enumerate(server.log_path.read_text().splitlines(), 1):
        try:
            lines.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"log line {number} is not JSON: {line!r}") from None
    return lines
