"""Interrupted pushes resume: a push client killed mid-transfer, or a target killed under it,
is taken up by the same command run again: same session, only what is still missing travels,
and the export is exact."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pairing_helpers import pair_by_demand
from push_helpers import export, mutate, push, push_process, random_image, sha256
from replicore.source import identity
from replicore.source.state import state_path

AGENT = "web01"
BLOCKS = 128


@pytest.fixture
def paired(server, admin, make_source) -> identity.Identity:
    source = make_source("resume")
    pair_by_demand(server, source, [AGENT], admin)
    return source


def _session_id(source: identity.Identity, server: Any, deadline: float) -> str:
    path = state_path(source, server.core_id, AGENT)
    while time.monotonic() < deadline:
        if path.exists():
            run = json.loads(path.read_text()).get("run") or {}
            session = (run.get("volumes") or {}).get("vol-c", {}).get("sessionId")
            if session:
                return str(session)
        time.sleep(0.05)
    raise AssertionError("the push never opened its session")


def _wait_transferred(
    source: identity.Identity, server: Any, session_id: str, at_least: int
) -> int:
    """Poll the session's bitmap until `at_least` blocks are durable; returns the count."""
    deadline = time.monotonic() + 60
    with server.client(source) as client:
        while time.monotonic() < deadline:
            answer = client.get(f"slave/sessions/{session_id}/transferredblocks")
            assert answer.status_code == 200, answer.text
            count = int.from_bytes(answer.content, "little").bit_count()
            if count >= at_least:
                return count
            time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} blocks arrived")


def _start_slow_push(source: identity.Identity, server: Any, image: Path) -> Any:
    return push_process(
        source, server, AGENT, {"vol-c": image}, "--max-rate", "1M", "--streams", "2"
    )


def test_killed_push_resumes_its_session(server, paired, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    data = random_image(image, BLOCKS * 64 * 1024)
    proc = _start_slow_push(paired, server, image)
    try:
        session_id = _session_id(paired, server, time.monotonic() + 30)
        _wait_transferred(paired, server, session_id, 16)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = push(paired, server, AGENT, {"vol-c": image}).result
    volume = result["volumes"][0]
    assert result["resumed_run"] is True
    assert volume["resumed"] is True and volume["session_id"] == session_id
    assert volume["epoch"] == 1
    assert volume["transferred_before"] >= 16
    # Only what the target still lacked travelled (records in flight at the kill may have
    # landed after the bitmap was read, so this is an upper bound).
    assert result["records_sent"] <= BLOCKS - volume["transferred_before"]
    assert result["records_sent"] == volume["missing_blocks"]
    assert sha256(export(server, AGENT, "vol-c", tmp_path / "out.img")) == sha256(data)
    again = push(paired, server, AGENT, {"vol-c": image}).result
    assert again["resumed_run"] is False and again["volumes"][0]["epoch"] == 2


def test_push_interrupted_by_a_target_crash_resumes_after_its_restart(
    server, paired, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    data = random_image(image, BLOCKS * 64 * 1024, seed=3)
    proc = _start_slow_push(paired, server, image)
    try:
        session_id = _session_id(paired, server, time.monotonic() + 30)
        _wait_transferred(paired, server, session_id, 8)
        server.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert err.decode().startswith("replicore: push: ") and err.decode().count("\n") == 1
    server.start()  # on a new port: the source learns the target's new address
    record = json.loads(paired.target_path(server.core_id).read_text())
    paired.save_target({**record, "url": server.url})
    result = push(paired, server, AGENT, {"vol-c": image}).result
    volume = result["volumes"][0]
    assert volume["session_id"] == session_id and volume["resumed"] is True
    assert volume["transferred_before"] >= 8
    assert result["records_sent"] <= BLOCKS - 8
    assert sha256(export(server, AGENT, "vol-c", tmp_path / "out.img")) == sha256(data)


def test_resumed_push_of_a_changed_image_rechecks_every_block(
    server, paired, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    random_image(image, BLOCKS * 64 * 1024, seed=4)
    proc = _start_slow_push(paired, server, image)
    try:
        session_id = _session_id(paired, server, time.monotonic() + 30)
        transferred = _wait_transferred(paired, server, session_id, 16)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Blocks the target already holds change: the bitmap must not be trusted.
    changed = mutate(image, 20, seed=9)
    data = image.read_bytes()
    result = push(paired, server, AGENT, {"vol-c": image}).result
    volume = result["volumes"][0]
    assert volume["session_id"] == session_id
    assert volume["transferred_before"] >= transferred
    assert result["records_sent"] == volume["missing_blocks"]
    assert result["records_sent"] >= len(changed)
    assert sha256(export(server, AGENT, "vol-c", tmp_path / "out.img")) == sha256(data)
