"""End-to-end tests of `replicore push` against a real server: exact exports, only changed
records travel, nothing travels without a change, one recovery point per run, chaining after
lost local state, rate limiting, and clear errors."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pairing_helpers import pair_by_demand
from push_helpers import export, make_image, mutate, push, push_args, random_image, sha256
from replicore import certs

AGENT = "web01"


@pytest.fixture
def paired(server, admin, make_source):
    source = make_source("push")
    pair_by_demand(server, source, [AGENT, "db01"], admin)
    return source


def test_push_then_export_gives_identical_bytes(server, paired, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    data = make_image(image, 64, tail=5000)
    result = push(paired, server, AGENT, {"vol-c": image}).result
    volume = result["volumes"][0]
    assert result["bytes_read"] == len(data)
    assert volume["epoch"] == 1 and volume["previous_epoch"] is None
    assert volume["blocks"] == 65
    # Repeated blocks (the zero ones) travel once.
    assert 0 < result["records_sent"] < 65
    assert result["records_sent"] == volume["missing_blocks"]
    assert result["bytes_sent"] < result["raw_bytes_sent"]  # compressed
    assert result["wire_bytes"] > result["bytes_sent"]
    assert result["recovery_point_complete"] is True
    assert sha256(export(server, AGENT, "vol-c", tmp_path / "out.img")) == sha256(data)


def test_changed_image_sends_only_the_changed_records(server, paired, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    first = make_image(image, 96)
    push(paired, server, AGENT, {"vol-c": image})
    changed = mutate(image, 5)
    second = image.read_bytes()
    result = push(paired, server, AGENT, {"vol-c": image}).result
    volume = result["volumes"][0]
    assert (volume["epoch"], volume["previous_epoch"]) == (2, 1)
    assert result["records_sent"] == len(changed)
    assert result["raw_bytes_sent"] == len(changed) * 64 * 1024
    assert result["bytes_read"] == len(second)
    out = tmp_path / "out.img"
    assert sha256(export(server, AGENT, "vol-c", out, "--epoch", "1")) == sha256(first)
    assert sha256(export(server, AGENT, "vol-c", out, "--epoch", "2")) == sha256(second)


def test_unchanged_image_sends_no_record(server, paired, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    data = make_image(image, 48)
    push(paired, server, AGENT, {"vol-c": image})
    result = push(paired, server, AGENT, {"vol-c": image}).result
    assert result["records_sent"] == 0 and result["bytes_sent"] == 0
    assert result["bytes_read"] == len(data)
    assert result["volumes"][0]["epoch"] == 2
    assert result["volumes"][0]["dedup_bytes"] == len(data)
    assert sha256(export(server, AGENT, "vol-c", tmp_path / "out.img")) == sha256(data)


def test_volumes_of_one_run_make_one_recovery_point(server, paired, tmp_path: Path) -> None:
    c, d = tmp_path / "c.img", tmp_path / "d.img"
    data_c, data_d = make_image(c, 32, seed=1), make_image(d, 40, seed=2, tail=100)
    result = push(paired, server, AGENT, {"vol-c": c, "vol-d": d}).result
    assert [v["driver_volume_id"] for v in result["volumes"]] == ["vol-c", "vol-d"]
    assert result["volumes"][0]["recovery_point_complete"] is False
    assert result["recovery_point_complete"] is True
    point = result["recovery_point_id"]
    out = tmp_path / "out.img"
    assert export(server, AGENT, "vol-c", out, "--recovery-point", point) == data_c
    assert export(server, AGENT, "vol-d", out, "--recovery-point", point) == data_d


def test_identical_data_of_another_agent_is_not_sent_again(server, paired, tmp_path) -> None:
    image = tmp_path / "disk.img"
    data = make_image(image, 32)
    push(paired, server, AGENT, {"vol-c": image})
    result = push(paired, server, "db01", {"vol-c": image}).result
    assert result["records_sent"] == 0
    assert export(server, "db01", "vol-c", tmp_path / "out.img") == data


def test_push_chains_onto_the_target_after_local_state_is_lost(
    server, paired, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    make_image(image, 16)
    push(paired, server, AGENT, {"vol-c": image})
    push(paired, server, AGENT, {"vol-c": image})
    shutil.rmtree(paired.directory / "state")
    mutate(image, 2)
    data = image.read_bytes()
    result = push(paired, server, AGENT, {"vol-c": image}).result
    volume = result["volumes"][0]
    assert (volume["epoch"], volume["previous_epoch"]) == (3, 2)
    assert result["records_sent"] == 2
    assert export(server, AGENT, "vol-c", tmp_path / "out.img") == data


def test_small_block_size_round_trips(server, paired, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    data = make_image(image, 8, tail=3000)
    result = push(paired, server, AGENT, {"vol-c": image}, "--block-size", "16K").result
    assert result["volumes"][0]["blocks"] == -(-len(data) // 16384)
    assert export(server, AGENT, "vol-c", tmp_path / "out.img") == data


def test_max_rate_paces_the_bytes_sent(server, paired, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, 1024 * 1024)
    rate = 512 * 1024
    started = time.monotonic()
    result = push(paired, server, AGENT, {"vol-c": image}, "--max-rate", str(rate)).result
    elapsed = time.monotonic() - started
    assert result["wire_bytes_sent"] > 1024 * 1024
    assert elapsed >= 0.8 * result["wire_bytes_sent"] / rate


def test_unknown_agent_is_a_clear_error(server, paired, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_image(image, 4)
    run = push(paired, server, "nobody", {"vol-c": image})
    assert run.status == 1
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1
    assert "not found on the target" in run.stderr and "nobody" in run.stderr


def test_wrong_pinned_certificate_is_refused(server, paired, tmp_path: Path) -> None:
    record = json.loads(paired.target_path(server.core_id).read_text())
    other, _ = certs.make_self_signed("impostor", server=True)
    record["certificate"] = other.decode()
    paired.save_target(record)
    image = tmp_path / "disk.img"
    make_image(image, 4)
    run = push(paired, server, AGENT, {"vol-c": image})
    assert run.status == 1
    assert "certificate other than the pinned one" in run.stderr


def test_unpaired_source_is_told_to_pair(server, make_source, tmp_path: Path) -> None:
    stranger = make_source("stranger")
    stranger.save_target({"url": server.url, "coreId": server.core_id, "certificate": server.pem})
    image = tmp_path / "disk.img"
    make_image(image, 4)
    run = push(stranger, server, AGENT, {"vol-c": image})
    assert run.status == 1
    assert "pair" in run.stderr
    assert run.stderr.count("\n") == 1


def test_source_without_pairing_record_is_told_to_pair(server, make_source, tmp_path) -> None:
    lonely = make_source("lonely")
    image = tmp_path / "disk.img"
    make_image(image, 4)
    run = push(lonely, server, AGENT, {"vol-c": image})
    assert run.status == 1
    assert "replicore source pair" in run.stderr


def test_bad_arguments_exit_with_status_2(server, paired, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_image(image, 4)
    run = push(paired, server, AGENT, {"vol-c": image}, "--block-size", "3000")
    assert run.status == 2 and "--block-size" in run.stderr
    missing = push(paired, server, AGENT, {"vol-c": tmp_path / "absent.img"})
    assert missing.status == 1 and "cannot open" in missing.stderr


def test_progress_is_drawn_on_a_terminal_only(server, paired, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_image(image, 16)
    args = push_args(paired, server, AGENT, {"vol-c": image})
    args.remove("--json")
    master, slave = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "replicore", *args],
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=60,
            check=False,
        )
        os.close(slave)
        drawn = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(master, 65536):
                drawn += chunk
    finally:
        os.close(master)
    assert done.returncode == 0
    assert b"\r" in drawn and b"read 1.0 MiB of 1.0 MiB" in drawn and b"ETA" in drawn
    assert b"epoch 1 committed" in done.stdout
    quiet = push(paired, server, AGENT, {"vol-c": image})  # stderr is no terminal here
    assert quiet.status == 0 and quiet.stderr == ""


def test_full_quota_is_a_clear_error_before_any_record_travels(
    server, admin, make_source, tmp_path: Path
) -> None:
    created = server.cli("repository", "create", "small", "--quota", "256K")
    assert created.status == 0, created.stderr
    source = make_source("quota")
    pair_by_demand(server, source, [AGENT], admin, repository="small")
    image = tmp_path / "disk.img"
    random_image(image, 1024 * 1024)
    run = push(source, server, AGENT, {"vol-c": image})
    assert run.status == 1
    assert "out of storage" in run.stderr and run.stderr.count("\n") == 1
    state = json.loads(next((source.directory / "state").rglob("*.json")).read_text())
    assert state["run"] is not None  # kept: the same command resumes once there is room


def _loop_device(backing: Path) -> str | None:
    """Attach `backing` to a loop device (root only); None when the machine cannot."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        return None
    done = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(backing)],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def test_block_device_is_pushed_like_a_file(server, paired, tmp_path: Path) -> None:
    backing = tmp_path / "backing.img"
    data = make_image(backing, 32)
    device = _loop_device(backing)
    if device is None:
        pytest.skip("needs root and a loop device")
    try:
        result = push(paired, server, AGENT, {"vol-c": Path(device)}).result
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)
    assert result["bytes_read"] == len(data)
    assert export(server, AGENT, "vol-c", tmp_path / "out.img") == data
