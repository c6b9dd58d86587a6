"""`replicore verify` and the scheduled verify: corrupt and missing records are found, the
images needing them are marked, corrupt records are forgotten, and the next push heals it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from faults_helpers import (
    corrupt_record,
    execute,
    image_id,
    integrity,
    query,
    single_use_key,
    verify,
)
from pairing_helpers import pair_by_demand
from push_helpers import export, make_image, mutate, push, sha256

AGENT, OTHER = "web01", "db01"


@pytest.fixture
def paired(server, admin, make_source):
    source = make_source("verify")
    pair_by_demand(server, source, [AGENT, OTHER], admin)
    return source


def exported(server, tmp_path: Path, epoch: int, agent: str = AGENT) -> str:
    out = tmp_path / f"{agent}-{epoch}.img"
    return sha256(export(server, agent, "vol", out, "--epoch", str(epoch)))


def test_verify_of_sound_data_is_clean_and_recorded(server, paired, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_image(image, 40)
    first = push(paired, server, AGENT, {"vol": image}).result
    status, report = verify(server)
    assert status == 0
    assert report["records_checked"] == first["records_sent"] > 0
    assert report["corrupt"] == report["missing"] == report["damaged_images"] == []
    text = server.cli("verify")
    assert text.status == 0 and text.stdout.strip().endswith("clean")
    runs = query(server, "SELECT origin, records_checked, corrupt_records FROM verify_runs")
    assert runs == [("command", first["records_sent"], 0), ("command", first["records_sent"], 0)]


def test_corrupt_record_is_forgotten_marked_and_healed_by_the_next_push(
    server, paired, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    make_image(image, 48, seed=3)
    push(paired, server, AGENT, {"vol": image})
    base = sha256(image.read_bytes())
    changed = mutate(image, 4)
    push(paired, server, AGENT, {"vol": image})
    second = sha256(image.read_bytes())
    singles = query(
        server,
        "SELECT min(block_index), key FROM image_blocks WHERE image_id = ? GROUP BY key"
        " HAVING count(*) = 1 ORDER BY 1",
        (image_id(server, AGENT, "vol", 1),),
    )
    # A block of epoch 1 that epoch 2 overrides: only epoch 1 needs its record.
    overridden, old_key = next((i, k) for i, k in singles if i in changed)
    (original,) = query(server, "SELECT data FROM records WHERE key = ?", (old_key,))[0]
    corrupt_record(server, old_key)
    status, report = verify(server, "--dry-run")
    assert status == 1 and [f["key"] for f in report["corrupt"]] == [old_key.hex()]
    assert [(b["volumeImage"], b["blockIndex"]) for b in report["corrupt"][0]["blocks"]] == [
        ("vol:1", overridden)
    ]
    execute(server, "UPDATE records SET data = ? WHERE key = ?", (original, old_key))
    # A block of epoch 1 that epoch 2 inherits (unchanged), with a record of its own.
    index, key = next((i, k) for i, k in singles if i not in changed)
    corrupt_record(server, key)

    status, report = verify(server)
    assert status == 1
    assert [(f["key"], f["reason"], f["forgotten"]) for f in report["corrupt"]] == [
        (key.hex(), "corrupt", True)
    ]
    assert sorted((b["volumeImage"], b["blockIndex"]) for b in report["corrupt"][0]["blocks"]) == [
        ("vol:1", index),
        ("vol:2", index),
    ]
    assert [i["volumeImage"] for i in report["damaged_images"]] == ["vol:1", "vol:2"]
    assert query(server, "SELECT count(*) FROM records WHERE key = ?", (key,)) == [(0,)]
    assert integrity(server) == [("ok",)]

    # Export refuses the damaged images, naming the block.
    refused = server.cli("export", "--agent", AGENT, "--volume", "vol", "-o", str(tmp_path / "x"))
    assert refused.status != 0 and f"block {index}" in refused.stderr
    # A second run still reports the images damaged (the record is now missing).
    status, again = verify(server)
    assert status == 1 and again["corrupt"] == []
    assert [f["key"] for f in again["missing"]] == [key.hex()]

    healed = push(paired, server, AGENT, {"vol": image}).result
    assert healed["records_sent"] == 1  # only the forgotten record travels again
    assert query(server, "SELECT count(*) FROM image_damage") == [(0,)]
    status, clean = verify(server)
    assert status == 0, clean
    assert exported(server, tmp_path, 1) == base
    assert exported(server, tmp_path, 2) == second
    assert exported(server, tmp_path, 3) == second


def test_missing_record_is_reported_and_a_dry_run_changes_nothing(
    server, paired, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    data = make_image(image, 24, seed=5)
    push(paired, server, AGENT, {"vol": image})
    index, key = single_use_key(server, image_id(server, AGENT, "vol", 1))
    assert execute(server, "DELETE FROM records WHERE key = ?", (key,)) == 1

    status, report = verify(server, "--dry-run")
    assert status == 1 and report["dry_run"] is True
    assert [(f["key"], f["reason"]) for f in report["missing"]] == [(key.hex(), "missing")]
    assert report["missing"][0]["blocks"][0]["blockIndex"] == index
    assert query(server, "SELECT count(*) FROM image_damage") == [(0,)]

    status, report = verify(server)
    assert status == 1
    assert query(server, "SELECT block_index, reason FROM image_damage") == [(index, "missing")]
    push(paired, server, AGENT, {"vol": image})
    assert verify(server)[0] == 0
    assert exported(server, tmp_path, 1) == sha256(data)


def test_verify_of_one_agent_checks_only_its_records(server, paired, tmp_path: Path) -> None:
    web, db = tmp_path / "web.img", tmp_path / "db.img"
    make_image(web, 16, seed=7)
    make_image(db, 16, seed=8)
    push(paired, server, AGENT, {"vol": web})
    push(paired, server, OTHER, {"vol": db})
    _, key = single_use_key(server, image_id(server, OTHER, "vol", 1))
    corrupt_record(server, key)

    status, report = verify(server, "--agent", AGENT)
    assert status == 0 and report["scope"].startswith(f"agent {AGENT} of source")
    status, report = verify(server, "--agent", OTHER, "--source", paired.core_id)
    assert status == 1
    assert [f["key"] for f in report["corrupt"]] == [key.hex()]
    assert [(i["agentId"], i["volumeImage"]) for i in report["damaged_images"]] == [
        (OTHER, "vol:1")
    ]
    unknown = server.cli("verify", "--agent", "nobody")
    assert unknown.status == 2 and "no agent 'nobody'" in unknown.stderr


def test_the_daemon_verifies_on_its_schedule(make_server, make_source, tmp_path: Path) -> None:
    server = make_server("[verify]\ninterval_hours = 0.0003\n")  # about a second
    admin = ("admin", "correct horse battery")
    assert server.cli("admin", "add", admin[0], "--password-stdin", stdin=admin[1]).status == 0
    source = make_source("scheduled")
    pair_by_demand(server, source, [AGENT], admin)
    image = tmp_path / "disk.img"
    data = make_image(image, 16, seed=9)
    push(source, server, AGENT, {"vol": image})
    _, key = single_use_key(server, image_id(server, AGENT, "vol", 1))
    corrupt_record(server, key)

    deadline = time.monotonic() + 60
    while not query(
        server, "SELECT 1 FROM verify_runs WHERE origin = 'schedule' AND corrupt_records = 1"
    ):
        assert time.monotonic() < deadline, "no scheduled verify found the corrupt record"
        time.sleep(0.2)
    assert query(server, "SELECT count(*) FROM records WHERE key = ?", (key,)) == [(0,)]
    assert query(server, "SELECT reason FROM image_damage") == [("corrupt",)]
    assert push(source, server, AGENT, {"vol": image}).result["records_sent"] == 1
    assert query(server, "SELECT count(*) FROM image_damage") == [(0,)]
    assert exported(server, tmp_path, 1) == sha256(data)
