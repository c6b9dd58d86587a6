"""The data path over a real server: sessions, key negotiation, verified records, commit,
export; deduplication per repository; bad input; background commit; quota; bitmaps."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import apsw
import blake3
import pytest

from datapath_helpers import (
    KIB,
    MIB,
    DataPathClient,
    bit,
    frame,
    key_entries,
    keys_checksum,
    make_image,
    mutate,
    records_body,
    split,
)
from pairing_helpers import db_snapshot, pair_by_demand
from replicore import protocol

BS = 16 * KIB


@pytest.fixture
def source(server, make_source, admin):
    """A source paired by demand with agents web01 and db01 (in its own repository)."""
    identity = make_source("a")
    pair_by_demand(server, identity, ["web01", "db01"], admin)
    return identity


@pytest.fixture
def web01(server, source):
    with server.client(source) as client:
        yield DataPathClient(client, "web01")


def query(server: Any, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = apsw.Connection(str(server.database_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def export(server: Any, tmp_path: Path, *args: str) -> bytes:
    out = tmp_path / "export.img"
    result = server.cli("export", *args, "-o", str(out), "--sha256")
    assert result.status == 0, result.stderr
    data = out.read_bytes()
    assert f"bytes   {len(data)}" in result.stdout
    assert f"blake3  {blake3.blake3(data).hexdigest()}" in result.stdout
    assert f"sha256  {hashlib.sha256(data).hexdigest()}" in result.stdout
    return data


def test_pushed_image_exports_byte_identical(server, web01, tmp_path):
    image = make_image(1, 2 * MIB + 5000, BS)
    pushed = web01.push("vol-c", 1, image, BS)
    assert pushed.commit == {
        "committed": True,
        "volumeImage": "vol-c:1",
        "recoveryPointComplete": True,
    }
    distinct = {protocol.record_key(b) for b in split(image, BS)}
    assert len(pushed.missing) == len(distinct) and pushed.stored == len(distinct)
    assert export(server, tmp_path, "--agent", "web01", "--volume", "vol-c") == image
    assert not (tmp_path / "export.img.tmp").exists()


def test_identical_request_resumes_the_open_session(web01):
    first = web01.open_ok("vol", 1, 1 * MIB, BS)
    assert first["resumed"] is False and first["blockCount"] == 64
    again = web01.open_ok("vol", 1, 1 * MIB, BS)
    assert again["sessionId"] == first["sessionId"] and again["resumed"] is True
    other = web01.open("vol", 1, 2 * MIB, BS)
    assert other.status_code == 409 and other.json()["field"] == "size"


def test_committed_epoch_is_refused_with_the_latest_committed_epoch(web01):
    image = make_image(2, 256 * KIB, BS)
    web01.push("vol", 1, image, BS)
    web01.push("vol", 2, image, BS, previous=1)
    response = web01.open("vol", 1, len(image), BS)
    assert response.status_code == 409
    assert response.json()["committedEpochNumber"] == 2


def test_keys_answer_only_the_records_the_repository_lacks(server, source, web01):
    image = make_image(3, 1 * MIB, BS)
    web01.push("vol", 1, image, BS)
    with server.client(source) as client:
        db01 = DataPathClient(client, "db01")  # same source, same repository
        opened = db01.open_ok("vol", 1, len(image) + BS, BS)
        blocks = split(image + b"\x07" * BS, BS)
        missing = db01.missing(opened["sessionId"], key_entries(blocks))
    assert missing == [len(blocks) - 1]


def test_deduplication_never_crosses_repositories(
    server, make_source, admin, source, web01, tmp_path
):
    image = make_image(4, 1 * MIB, BS)
    first = web01.push("vol", 1, image, BS)
    other = make_source("b")
    pair_by_demand(server, other, ["web01"], admin)  # its own repository
    theirs = mutate(image, BS, [0], seed=2)
    with server.client(other) as client:
        pushed = DataPathClient(client, "web01").push("vol", 1, theirs, BS)
    distinct = {protocol.record_key(b) for b in split(theirs, BS)}
    assert len(pushed.missing) == pushed.stored == len(distinct)  # nothing of the first's
    assert len(first.missing) == first.stored
    # both sources have an agent web01: export needs --source
    ambiguous = server.cli("export", "--agent", "web01", "--volume", "vol", "-o", "x")
    assert ambiguous.status != 0 and "--source" in ambiguous.stderr
    args = ("--agent", "web01", "--volume", "vol", "--source")
    assert export(server, tmp_path, *args, source.core_id) == image
    assert export(server, tmp_path, *args, other.core_id) == theirs


def test_record_not_matching_its_key_is_refused_and_earlier_records_kept(web01):
    blocks = [bytes([i + 1]) * BS for i in range(4)]
    sid = web01.open_ok("vol", 1, 4 * BS, BS)["sessionId"]
    assert web01.missing(sid, key_entries(blocks)) == [0, 1, 2, 3]
    body = records_body(
        [
            frame(0, blocks[0]),
            frame(1, blocks[1]),
            frame(2, b"\xee" * BS, key=protocol.record_key(blocks[2])),
            frame(3, blocks[3]),
        ]
    )
    response = web01.rawdata(sid, body)
    assert response.status_code == 422
    answer = response.json()
    assert answer["blockIndex"] == 2 and "block 2" in answer["message"]
    assert answer["stored"] == 2 and answer["alreadyPresent"] == 0
    bitmap = web01.bitmap(sid).content
    assert [bit(bitmap, i) for i in range(4)] == [True, True, False, False]


def test_truncated_record_stream_is_refused(web01):
    blocks = [bytes([i + 1]) * BS for i in range(2)]
    sid = web01.open_ok("vol", 1, 2 * BS, BS)["sessionId"]
    web01.missing(sid, key_entries(blocks))
    body = records_body([frame(0, blocks[0], compress=False), frame(1, blocks[1])])
    response = web01.rawdata(sid, body[:-10])
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request" and "ended" in response.json()["message"]
    assert response.json()["stored"] == 1  # the complete record before the cut is kept
    empty = web01.rawdata(sid, b"")
    assert empty.status_code == 400


def test_block_index_outside_the_image_is_refused(web01):
    sid = web01.open_ok("vol", 1, 4 * BS, BS)["sessionId"]
    blocks = [b"\x01" * BS] * 5
    keys = web01.keys(sid, protocol.encode_keys(key_entries(blocks, [4])))
    assert keys.status_code == 422 and keys.json()["blockIndex"] == 4
    web01.missing(sid, key_entries(blocks, [0]))
    data = web01.rawdata(sid, records_body([frame(4, blocks[4])]))
    assert data.status_code == 422 and data.json()["blockIndex"] == 4
    short = web01.keys(sid, protocol.encode_keys([protocol.KeyEntry(1, bytes(32), BS - 1)]))
    assert short.status_code == 422 and short.json()["blockIndex"] == 1
    twice = key_entries(blocks, [2, 3, 2])
    dup = web01.keys(sid, protocol.encode_keys(twice))
    assert dup.status_code == 422 and dup.json()["blockIndex"] == 2
    garbage = web01.keys(sid, b"RKY2" + bytes(4))
    assert garbage.status_code == 400


def test_another_sources_session_is_not_found(server, make_source, admin, web01):
    sid = web01.open_ok("vol", 1, 4 * BS, BS)["sessionId"]
    intruder = make_source("intruder")
    pair_by_demand(server, intruder, ["web01"], admin)
    entries = key_entries([b"\x01" * BS], [0])
    with server.client(intruder) as client:
        other = DataPathClient(client, "web01")
        assert other.keys(sid, protocol.encode_keys(entries)).status_code == 404
        assert other.rawdata(sid, records_body([frame(0, b"\x01" * BS)])).status_code == 404
        assert other.end(sid, True, 4, "0" * 64).status_code == 404
        assert other.end(sid, False).status_code == 404
        assert other.bitmap(sid).status_code == 404
        assert other.poke(sid).status_code == 404
        assert other.image_bitmap("vol", 1).status_code == 404
        assert other.keys(sid, b"", agent_id="db01").status_code == 404  # not its agent
    assert web01.bitmap(sid).status_code == 200


def test_commit_with_missing_blocks_is_refused_and_no_image_is_visible(server, web01, tmp_path):
    image = make_image(5, 512 * KIB, BS)
    blocks = split(image, BS)
    sid = web01.open_ok("vol", 1, len(image), BS)["sessionId"]
    entries = key_entries(blocks)
    missing = web01.missing(sid, entries)
    web01.send_records(sid, blocks, missing[:-3])
    refused = web01.end(sid, True, len(blocks), keys_checksum(entries))
    assert refused.status_code == 422
    assert refused.json()["missingBlocks"] >= 3 and "missing" in refused.json()["message"]
    assert query(server, "SELECT count(*) FROM volume_images") == [(0,)]
    assert server.cli("export", "--agent", "web01", "--volume", "vol", "-o", "x").status != 0
    bad_sum = web01.end(sid, True, len(blocks), "ab" * 32)
    assert bad_sum.status_code == 422
    web01.send_records(sid, blocks, missing[-3:])
    wrong = web01.end(sid, True, len(blocks), "ab" * 32)
    assert wrong.status_code == 422 and wrong.json()["field"] == "keysChecksum"
    done = web01.end(sid, True, len(blocks), keys_checksum(entries))
    assert done.status_code == 200
    assert web01.end(sid, True, len(blocks), keys_checksum(entries)).status_code == 404
    assert export(server, tmp_path, "--agent", "web01", "--volume", "vol", "--epoch", "1") == image


def test_incremental_epoch_stores_only_changed_blocks(server, web01, tmp_path):
    base = make_image(6, 2 * MIB, BS)
    changed = mutate(base, BS, [1, 50, 127], seed=7)
    web01.push("vol", 1, base, BS)
    second = web01.push("vol", 2, changed, BS, previous=1)
    assert sorted(second.missing) == [1, 50, 127] and second.stored == 3
    assert query(
        server, "SELECT epoch_number, stored_block_count FROM volume_images ORDER BY 1"
    ) == [(1, 128), (2, 3)]
    again = mutate(changed, BS, [2], seed=8)
    third = web01.push("vol", 3, again, BS, previous=2, only=[2])  # a change-tracking source
    assert third.missing == [2]
    args = ("--agent", "web01", "--volume", "vol")
    assert export(server, tmp_path, *args, "--epoch", "1") == base
    assert export(server, tmp_path, *args, "--epoch", "2") == changed
    assert export(server, tmp_path, *args) == again
    assert export(server, tmp_path, *args, "--recovery-point", "rp-vol-2") == changed


def test_orphaned_image_is_kept_and_export_names_the_missing_epoch(server, web01, tmp_path):
    base = make_image(8, 256 * KIB, BS)
    later = mutate(base, BS, [0], seed=1)
    web01.push("vol", 5, later, BS, previous=4)
    refused = server.cli("export", "--agent", "web01", "--volume", "vol", "-o", str(tmp_path / "o"))
    assert refused.status != 0 and "epoch 4" in refused.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()
    web01.push("vol", 4, base, BS)
    assert export(server, tmp_path, "--agent", "web01", "--volume", "vol", "--epoch", "5") == later


def test_background_commit_is_reported_by_poke(web01):
    image = make_image(9, 1 * MIB, BS)
    blocks = split(image, BS)
    sid = web01.open_ok("vol", 1, len(image), BS)["sessionId"]
    entries = key_entries(blocks)
    missing = web01.missing(sid, entries)
    web01.send_records(sid, blocks, missing[1:])
    started = web01.end(sid, True, len(blocks), keys_checksum(entries), background=True)
    assert started.status_code == 202 and started.json() == {"started": True}
    while (poked := web01.poke(sid)).status_code == 200 and poked.json() is False:
        pass
    assert poked.status_code == 422 and poked.json()["blocksWithoutRecord"] >= 1
    web01.send_records(sid, blocks, missing[:1])
    started = web01.end(sid, True, len(blocks), keys_checksum(entries), background=True)
    assert started.status_code == 202
    while (poked := web01.poke(sid)).json() is False:
        pass
    assert poked.status_code == 200 and poked.json() is True
    assert web01.image_bitmap("vol", 1).content == b"\xff" * 8


def test_discard_keeps_records_for_deduplication(web01):
    blocks = [bytes([i + 1]) * BS for i in range(3)]
    sid = web01.open_ok("vol", 1, 3 * BS, BS)["sessionId"]
    web01.send_records(sid, blocks, web01.missing(sid, key_entries(blocks)))
    assert web01.end(sid, commit=False).json() == {"committed": False, "discarded": True}
    assert web01.bitmap(sid).status_code == 404
    sid = web01.open_ok("vol", 1, 3 * BS, BS)["sessionId"]
    assert web01.missing(sid, key_entries(blocks)) == []


def test_quota_full_is_refused_at_keys_before_any_data(server, make_source, admin):
    assert server.cli("repository", "create", "small", "--quota", "64K").status == 0
    tenant = make_source("small")
    pair_by_demand(server, tenant, ["web01"], admin, repository="small")
    blocks = [bytes([i + 1]) * BS for i in range(8)]
    with server.client(tenant) as client:
        web01 = DataPathClient(client, "web01")
        sid = web01.open_ok("vol", 1, 8 * BS, BS)["sessionId"]
        before = db_snapshot(server)
        refused = web01.keys(sid, protocol.encode_keys(key_entries(blocks)))
        assert refused.status_code == 507
        assert refused.json()["error"] == "insufficient_storage"
        assert db_snapshot(server) == before
        assert web01.missing(sid, key_entries(blocks, [0, 1])) == [0, 1]  # 32 KiB fit


def test_transferred_blocks_bitmaps(web01):
    blocks = [bytes([i + 1]) * BS for i in range(11)]
    sid = web01.open_ok("vol", 1, 11 * BS, BS)["sessionId"]
    web01.send_records(sid, blocks, web01.missing(sid, key_entries(blocks))[::2])
    response = web01.bitmap(sid)
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["X-Block-Count"] == "11"
    assert response.content == bytes([0b01010101, 0b00000101])
    assert web01.image_bitmap("vol", 1).content == response.content
    assert web01.image_bitmap("vol", 2).status_code == 404
    assert web01.image_bitmap("vol", "x").status_code == 422
    assert web01.image_bitmap("vol", "\u00b2").status_code == 422  # isdigit(), not int()


def test_bad_session_requests_are_refused_naming_the_field(server, web01):
    before = db_snapshot(server)
    cases = {
        "blockSize": {"blockSize": 3000},
        "driverVolumeId": {"driverVolumeId": "a/b"},
        "epochNumber": {"epochNumber": 2**32},
        "previousEpochNumber": {"previousEpochNumber": 1},
        "recoveryPointTimestamp": {"recoveryPointTimestamp": "yesterday"},
        "size": {"size": 0},
        "volumeCount": {"volumeCount": 0},
    }
    for name, override in cases.items():
        body = {**web01.session_body("vol", 1, MIB, BS), **override}
        response = web01.client.post("slave/sessions/new", json=body)
        assert response.status_code == 422, (name, response.text)
        assert response.json()["field"] == name
    missing_field = web01.session_body("vol", 1, MIB, BS)
    del missing_field["size"]
    response = web01.client.post("slave/sessions/new", json=missing_field)
    assert response.status_code == 422 and response.json()["field"] == "size"
    malformed = web01.client.post("slave/sessions/new", content=b"{not json")
    assert malformed.status_code == 400
    unknown = web01.client.post(
        "slave/sessions/new", json=web01.session_body("vol", 1, MIB, BS, agentId="nobody")
    )
    assert unknown.status_code == 404
    assert db_snapshot(server) == before


def test_data_path_needs_a_paired_certificate(server, web01):
    with server.client() as anonymous:
        assert anonymous.post("slave/sessions/new", json={}).status_code == 401
        assert anonymous.get(f"slave/sessions/{'0' * 32}/transferredblocks").status_code == 401
