"""Seed drives end to end over a real server: a drive made on the source and consumed on the
target, then a push that sends only the changed blocks; orphaned chains repaired; forged,
modified and unsigned drives refused with nothing imported; consuming twice; the source's
view of its drives (outstanding, consumed, abandoned); consumedSeedDrives access."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pairing_helpers import db_snapshot, pair_by_demand
from push_helpers import export, make_image, mutate, push, sha256
from replicore import seed_drive
from replicore.store import seed_drives
from seed_drive_helpers import (
    create_drive,
    query,
    read_manifest,
    run,
    tampered,
    write_manifest,
)

BLOCKS = 24


@pytest.fixture
def source(server, make_source, admin):
    """A source paired by demand with agent web01 (in its own repository)."""
    identity = make_source("a")
    pair_by_demand(server, identity, ["web01"], admin)
    return identity


def consume(server: Any, drive: Path, *extra: str) -> Any:
    return server.cli("seed-drive", "consume", str(drive), *extra)


def consumed_ids(server: Any, source: Any, agent: str = "web01") -> list[str]:
    with server.client(source) as client:
        response = client.get(f"consumedSeedDrives/{agent}")
    assert response.status_code == 200, response.text
    ids: list[str] = response.json()["seedDriveIds"]
    return ids


def test_drive_consumed_then_push_sends_only_the_changed_blocks(server, source, tmp_path):
    image = tmp_path / "c.img"
    first = make_image(image, BLOCKS, seed=1, tail=1000)
    made = create_drive(source, "web01", {"vol-c": image}, tmp_path / "seed.drive")
    assert [(v["epochNumber"], v["previousEpochNumber"]) for v in made["volumes"]] == [(1, None)]
    assert made["targetCoreId"] == server.core_id

    result = consume(server, tmp_path / "seed.drive")
    assert result.status == 0, result.stderr
    assert f"consumed seed drive {made['driveId']}" in result.stdout
    assert "vol-c:1: imported" in result.stdout
    assert consumed_ids(server, source) == [made["driveId"]]

    changed = mutate(image, 3, seed=5)
    second = image.read_bytes()
    pushed = push(source, server, "web01", {"vol-c": image}).result
    volume = pushed["volumes"][0]
    assert (volume["epoch"], volume["previous_epoch"]) == (2, 1)
    assert pushed["records_sent"] == len(changed) == 3

    out = tmp_path / "out.img"
    assert sha256(export(server, "web01", "vol-c", out, "--epoch", "1")) == sha256(first)
    assert sha256(export(server, "web01", "vol-c", out, "--epoch", "2")) == sha256(second)
    stored = query(
        server,
        "SELECT epoch_number, stored_block_count FROM volume_images ORDER BY epoch_number",
    )
    assert stored == [(1, BLOCKS + 1), (2, 3)]


def test_consuming_a_drive_twice_does_nothing_the_second_time(server, source, tmp_path):
    image = tmp_path / "c.img"
    make_image(image, 8, seed=2)
    made = create_drive(source, "web01", {"vol-c": image}, tmp_path / "seed.drive")
    assert consume(server, tmp_path / "seed.drive").status == 0
    before = db_snapshot(server)
    again = consume(server, tmp_path / "seed.drive")
    assert again.status == 0, again.stderr
    assert f"seed drive {made['driveId']}" in again.stdout and "already consumed" in again.stdout
    assert db_snapshot(server) == before


def _forge_record(conn: Any) -> None:
    key, data = conn.execute("SELECT key, data FROM records ORDER BY key LIMIT 1").fetchone()
    data = bytes([data[0] ^ 1]) + data[1:]
    conn.execute("UPDATE records SET data = ? WHERE key = ?", (data, key))


def _forge_manifest(conn: Any) -> None:
    manifest = read_manifest(conn)
    manifest["images"][0]["epochNumber"] = 7
    write_manifest(conn, manifest)


def _forge_block_map(conn: Any) -> None:
    first, second = conn.execute(
        "SELECT key FROM image_blocks ORDER BY block_index LIMIT 2"
    ).fetchall()
    conn.execute("UPDATE image_blocks SET key = ? WHERE block_index = 1", (first[0],))
    assert first != second


def _unsign(conn: Any) -> None:
    conn.execute("DELETE FROM drive WHERE name = 'signature'")


def _other_key(other: Any) -> Any:
    def forge(conn: Any) -> None:
        # Rewrite the records' digest as a forger would, and sign with a key not paired here.
        _forge_record(conn)
        digest = seed_drive.RecordsDigest()
        for key, raw, codec, data in conn.execute(
            "SELECT key, raw_length, codec, data FROM records ORDER BY key"
        ):
            digest.update(key, raw, codec, data)
        manifest = read_manifest(conn)
        manifest["recordsDigest"] = digest.hexdigest()
        data = write_manifest(conn, manifest)
        signature = seed_drive.sign(seed_drive.load_private_key(other.key_path), data)
        conn.execute("UPDATE drive SET value = ? WHERE name = 'signature'", (signature,))

    return forge


def test_forged_modified_or_unsigned_drives_are_refused_and_nothing_imported(
    server, source, make_source, tmp_path
):
    image = tmp_path / "c.img"
    make_image(image, 8, seed=3)
    drive = tmp_path / "seed.drive"
    create_drive(source, "web01", {"vol-c": image}, drive)
    cases = {
        "record": (_forge_record, "records differ from those its manifest signs for"),
        "manifest": (_forge_manifest, "signature does not verify"),
        "block map": (_forge_block_map, "block map of image vol-c:1 differs"),
        "unsigned": (_unsign, "not signed"),
        "other key": (_other_key(make_source("forger")), "signature does not verify"),
    }
    before = db_snapshot(server)
    for name, (forge, message) in cases.items():
        copy = tmp_path / f"forged-{name}.drive"
        with tampered(drive, copy) as conn:
            forge(conn)
        result = consume(server, copy)
        assert result.status == 1, (name, result.stdout)
        assert "refused" in result.stderr and message in result.stderr, (name, result.stderr)
        assert db_snapshot(server) == before, name
    assert consume(server, drive).status == 0


def test_drive_of_a_source_not_paired_here_is_refused(server, make_source, admin, tmp_path):
    stranger = make_source("stranger")
    image = tmp_path / "c.img"
    make_image(image, 4, seed=4)
    create_drive(stranger, "web01", {"vol-c": image}, tmp_path / "seed.drive")
    result = consume(server, tmp_path / "seed.drive")
    assert result.status == 1
    assert "not paired with this core" in result.stderr
    garbage = tmp_path / "garbage.drive"
    garbage.write_bytes(b"not a drive at all" * 100)
    result = consume(server, garbage)
    assert result.status == 1 and "is not a seed drive" in result.stderr


def test_drive_repairs_the_chain_of_an_image_pushed_before_it_arrived(server, source, tmp_path):
    image = tmp_path / "c.img"
    first = make_image(image, 12, seed=6)
    create_drive(source, "web01", {"vol-c": image}, tmp_path / "seed.drive")
    mutate(image, 2, seed=7)
    second = image.read_bytes()
    pushed = push(source, server, "web01", {"vol-c": image}).result
    assert (pushed["volumes"][0]["epoch"], pushed["volumes"][0]["previous_epoch"]) == (2, 1)
    refused = server.cli("export", "--agent", "web01", "--volume", "vol-c", "-o", "/dev/null")
    assert refused.status != 0 and "orphaned" in refused.stderr

    result = consume(server, tmp_path / "seed.drive")
    assert result.status == 0, result.stderr
    assert "repaired: volume image vol-c:2 is no longer orphaned" in result.stdout
    out = tmp_path / "out.img"
    assert export(server, "web01", "vol-c", out, "--epoch", "2") == second
    assert export(server, "web01", "vol-c", out, "--epoch", "1") == first


def test_import_cut_before_its_last_transaction_leaves_nothing_visible(
    server, source, tmp_path, monkeypatch
):
    image = tmp_path / "c.img"
    data = make_image(image, 10, seed=8)
    drive = tmp_path / "seed.drive"
    create_drive(source, "web01", {"vol-c": image}, drive)

    def crash(*args: Any) -> None:
        raise KeyboardInterrupt  # as a kill would, after the records went in

    monkeypatch.setattr(seed_drives, "_finish", crash)
    assert consume(server, drive).status == 130
    assert query(server, "SELECT count(*) FROM records")[0][0] > 0
    for table in ("volume_images", "recovery_points", "seed_drives", "seed_drive_images"):
        assert query(server, f"SELECT count(*) FROM {table}") == [(0,)], table
    monkeypatch.undo()

    result = consume(server, drive, "--json")
    assert result.status == 0, result.stderr
    assert '"records_stored":0' in result.stdout.replace(" ", "")
    assert export(server, "web01", "vol-c", tmp_path / "out.img") == data


def test_unapproved_agent_needs_a_repository_to_be_approved_into(server, source, tmp_path):
    image = tmp_path / "c.img"
    data = make_image(image, 4, seed=9)
    drive = tmp_path / "seed.drive"
    create_drive(source, "db01", {"vol-d": image}, drive)
    refused = consume(server, drive)
    assert refused.status == 1 and "agent db01" in refused.stderr
    assert "--repository" in refused.stderr
    assert server.cli("repository", "create", "seeded").status == 0
    result = consume(server, drive, "--repository", "seeded")
    assert result.status == 0, result.stderr
    assert "agent db01 approved into repository seeded" in result.stdout
    assert export(server, "db01", "vol-d", tmp_path / "out.img") == data
    assert consumed_ids(server, source, "db01") != []


def test_source_lists_its_drives_and_abandons_an_outstanding_one(server, source, tmp_path):
    image = tmp_path / "c.img"
    make_image(image, 6, seed=10)
    first = create_drive(source, "web01", {"vol-c": image}, tmp_path / "one.drive")
    mutate(image, 1, seed=11)
    second = create_drive(source, "web01", {"vol-c": image}, tmp_path / "two.drive")
    assert [v["epochNumber"] for v in second["volumes"]] == [2]
    assert consume(server, tmp_path / "one.drive").status == 0

    listing = run("seed-drive", "list", "--created", "--dir", str(source.directory), "--json")
    states = {e["driveId"]: e["state"] for e in listing.json}
    assert states == {first["driveId"]: "consumed", second["driveId"]: "outstanding"}

    refused = run("seed-drive", "abandon", first["driveId"], "--dir", str(source.directory))
    assert refused.status == 1 and "was consumed" in refused.stderr
    done = run("seed-drive", "abandon", second["driveId"][:8], "--dir", str(source.directory))
    assert done.status == 0, done.stderr
    listing = run("seed-drive", "list", "--created", "--dir", str(source.directory), "--json")
    assert {e["driveId"]: e["state"] for e in listing.json}[second["driveId"]] == "abandoned"

    pushed = push(source, server, "web01", {"vol-c": image}).result
    assert (pushed["volumes"][0]["epoch"], pushed["volumes"][0]["previous_epoch"]) == (2, 1)
    assert pushed["records_sent"] == 1
    target_list = server.cli("seed-drive", "list")
    assert target_list.status == 0 and first["driveId"] in target_list.stdout


def test_consumed_seed_drives_only_for_the_callers_own_agents(
    server, source, make_source, admin, tmp_path
):
    other = make_source("b")
    pair_by_demand(server, other, ["db02"], admin)
    with server.client(other) as client:
        assert client.get("consumedSeedDrives/web01").status_code == 404
        assert client.get("consumedSeedDrives/db02").json()["seedDrives"] == []
    with server.client(source) as client:
        assert client.get("consumedSeedDrives/nobody").status_code == 404
    with server.client() as client:
        assert client.get("consumedSeedDrives/web01").status_code == 401


def test_drive_made_for_another_target_or_over_quota_is_refused(
    server, make_server, source, tmp_path
):
    other = make_server(name="other")
    assert (
        other.cli("admin", "add", "root", "--password-stdin", stdin="long enough pw\n").status == 0
    )
    pair_by_demand(other, source, ["web01"], ("root", "long enough pw"))
    image = tmp_path / "c.img"
    make_image(image, 6, seed=12)
    elsewhere = create_drive(
        source, "web01", {"vol-c": image}, tmp_path / "other.drive", "--target", other.url
    )
    assert elsewhere["targetCoreId"] == other.core_id
    before = db_snapshot(server)
    result = consume(server, tmp_path / "other.drive")
    assert result.status == 1 and f"made for core {other.core_id}" in result.stderr

    create_drive(source, "web01", {"vol-c": image}, tmp_path / "seed.drive", "--target", server.url)
    repository = query(
        server,
        "SELECT r.name FROM repositories r JOIN agents a"
        " ON a.repository_id = r.id WHERE a.agent_id = 'web01'",
    )[0][0]
    assert server.cli("repository", "quota", repository, "64K").status == 0
    before = db_snapshot(server)
    result = consume(server, tmp_path / "seed.drive")
    assert result.status == 1 and "quota" in result.stderr
    assert db_snapshot(server) == before
