"""The `replicore serve` process of a benchmark script: start it and wait until it answers
(its `daemon.json` names its URL and fingerprint), stop it; and the SHA-256 of a file, with
which the scripts compare exported images."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

MIB = 1024 * 1024


def start(
    cmd: list[str],
    state: Path,
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start the daemon `cmd` (its state directory `state`, output appended to `log_path`);
    returns it with its first URL and its certificate's fingerprint once it is up."""
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=log_file, cwd=cwd, env=env)
    info = state / "daemon.json"
    deadline = time.monotonic() + timeout
    while not info.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: see {log_path}")
        time.sleep(0.05)
    data = json.loads(info.read_text())
    return proc, data["urls"][0], data["fingerprint"]


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, and SIGKILL if it has not stopped within 30 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()
