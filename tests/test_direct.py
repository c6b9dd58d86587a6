"""Direct (O3E) replication over a real server: `replicore push --direct` exports exactly, on
its own and on top of a normal push; the bitmap, data channel, resume, framed zstd blocks;
bad bitmaps and data beyond the bitmap refused; other sources' sessions not found; and the
direct routes do not clash with the agent routes."""

from __future__ import annotations

import random
import struct
import uuid
from typing import Any

import pytest
import zstandard

from pairing_helpers import pair_by_demand
from push_helpers import export, make_image, mutate, push
from seed_drive_helpers import DirectClient, bitmap_of, query

KIB = 1024
BS = 4 * KIB


@pytest.fixture
def source(server, make_source, admin):
    """A source paired by demand with agent web01 (in its own repository)."""
    identity = make_source("a")
    pair_by_demand(server, identity, ["web01"], admin)
    return identity


@pytest.fixture
def web01(server, source):
    with server.client(source) as client:
        yield DirectClient(client, "web01")


def blocks_of(data: bytes, block_size: int = BS) -> list[bytes]:
    return [data[i : i + block_size] for i in range(0, len(data), block_size)]


def small_image(seed: int, count: int, zero: set[int], tail: int = 0) -> bytes:
    """`count` blocks of BS (random except those in `zero`), plus a short last block."""
    rng = random.Random(seed)
    parts = [bytes(BS) if i in zero else rng.randbytes(BS) for i in range(count)]
    return b"".join(parts) + rng.randbytes(tail)


def start(web01: DirectClient, volume: str, data: bytes, previous: int | None = None) -> str:
    """Open a direct session for `data` as epoch 1 (or previous+1) and set its file."""
    epoch = 1 if previous is None else previous + 1
    session = web01.open_ok(volume, epoch, len(data), BS, previous)["sessionId"]
    response = web01.set_file(session, web01.file_body(volume, len(data), BS))
    assert response.status_code == 200, response.text
    return str(session)


def test_push_direct_exports_exactly(server, source, tmp_path):
    image = tmp_path / "c.img"
    data = make_image(image, 20, seed=1, tail=3000)
    blocks = blocks_of(data, 64 * KIB)
    used = [b for b in blocks if b.count(0) != len(b)]
    result = push(source, server, "web01", {"vol-c": image}, "--direct").result
    assert result["direct"] is True
    volume = result["volumes"][0]
    assert (volume["epoch"], volume["previous_epoch"]) == (1, None)
    assert volume["used_blocks"] == volume["blocks_sent"] == len(used) < len(blocks)
    assert export(server, "web01", "vol-c", tmp_path / "out.img") == data
    distinct = {b for b in used} | {bytes(64 * KIB)}
    assert query(server, "SELECT count(*) FROM records")[0][0] == len(distinct)


def test_direct_push_on_top_of_a_normal_push_stores_only_the_changes(server, source, tmp_path):
    image = tmp_path / "c.img"
    first = make_image(image, 16, seed=2)
    assert push(source, server, "web01", {"vol-c": image}).status == 0
    mutate(image, 2, seed=3)
    second = image.read_bytes()
    result = push(source, server, "web01", {"vol-c": image}, "--direct").result
    volume = result["volumes"][0]
    assert (volume["epoch"], volume["previous_epoch"]) == (2, 1)
    assert result["records_stored"] == 2
    assert query(server, "SELECT stored_block_count FROM volume_images WHERE epoch_number = 2") == [
        (2,)
    ]
    out = tmp_path / "out.img"
    assert export(server, "web01", "vol-c", out, "--epoch", "1") == first
    assert export(server, "web01", "vol-c", out, "--epoch", "2") == second
    again = push(source, server, "web01", {"vol-c": image}).result
    assert (again["volumes"][0]["epoch"], again["records_sent"]) == (3, 0)


def test_data_channel_resumes_at_the_block_the_target_names(server, web01, tmp_path):
    data = small_image(4, 8, zero={1, 6}, tail=100)
    blocks = blocks_of(data)
    session = start(web01, "vol-r", data)
    answer = web01.bitmap(session, bitmap_of(blocks)).json()
    assert (answer["usedBlockCount"], answer["nextBlockIndex"]) == (7, 0)

    first = web01.data(session, 0, blocks[0] + blocks[2])
    assert first.status_code == 200, first.text
    assert first.json()["nextBlockIndex"] == 3 and first.json()["committed"] is False
    replay = web01.data(session, 0, blocks[0])
    assert replay.status_code == 409 and replay.json()["nextBlockIndex"] == 3
    cut = web01.data(session, 3, blocks[3] + blocks[4][:100])
    assert cut.status_code == 422 and cut.json()["nextBlockIndex"] == 4, cut.text
    description = web01.description(session).json()
    assert description["receivedBlockCount"] == 3 and description["nextBlockIndex"] == 4

    zstd = zstandard.ZstdCompressor(level=1)
    framed = b""
    for index in (4, 5, 7, 8):
        frame = zstd.compress(blocks[index])
        framed += struct.pack(">IB", len(frame), 1) + frame
    done = web01.data(session, 4, framed, codec="framed")
    assert done.status_code == 200, done.text
    assert done.json()["committed"] is True and done.json()["volumeImage"] == "vol-r:1"
    assert web01.file_info(session).status_code == 404  # the session ended with its commit
    assert export(server, "web01", "vol-r", tmp_path / "out.img") == data


def test_file_info_and_repository_connection_describe_the_session(server, web01):
    data = small_image(5, 4, zero=set())
    session = web01.open_ok("vol-f", 1, len(data), BS)["sessionId"]
    assert web01.file_info(session).status_code == 409  # not set yet
    assert web01.set_file(session, web01.file_body("vol-f", len(data), BS)).status_code == 200
    info = web01.file_info(session).json()
    assert info == {
        "fullPath": "/snapshots/vol-f.img",
        "openInfo": {
            "blockSize": BS,
            "scid": "6c1c1c86-0000-4000-8000-000000000001",
            "size": len(data),
            "volumeId": "vol-f",
            "imageType": "base",
            "partial": False,
        },
    }
    description = web01.description(session).json()
    assert description["dataUrl"].startswith(server.url)
    assert description["dataUrl"].endswith(
        f"/directreplication/slave/web01/job-d/{session}/o3edata"
    )
    assert description["blockSize"] == BS and description["blockCount"] == 4
    assert description["maxBytesPerRequest"] > 0 and description["freeBytes"] > 0
    assert description["codecs"] == ["raw", "framed"]
    assert description["bitmapSet"] is False and description["nextBlockIndex"] is None


def test_bad_bitmaps_and_file_info_are_refused(server, web01):
    data = small_image(6, 10, zero={2})
    session = web01.open_ok("vol-b", 1, len(data), BS)["sessionId"]
    good = bitmap_of(blocks_of(data))
    assert web01.bitmap(session, good).status_code == 409  # the snapshot file comes first
    wrong = web01.set_file(session, web01.file_body("vol-b", len(data), 8 * KIB))
    assert wrong.status_code == 422 and wrong.json()["field"] == "openInfo.blockSize"
    assert web01.set_file(session, web01.file_body("vol-b", len(data), BS)).status_code == 200
    for bits in (good[:1], good + b"\x00", b""):
        response = web01.bitmap(session, bits)
        assert response.status_code == 422, bits
        assert response.json()["expectedBytes"] == 2
    padded = web01.bitmap(session, good[:1] + bytes([good[1] | 0x04]))
    assert padded.status_code == 422 and "past the last block" in padded.json()["message"]
    assert web01.data(session, 0, data[:BS]).status_code == 409  # no bitmap yet
    assert web01.bitmap(session, good).status_code == 200
    assert web01.bitmap(session, good).status_code == 200  # the same again is fine
    assert web01.bitmap(session, bytes(2)).status_code == 409


def test_data_beyond_the_bitmap_is_refused(server, web01, tmp_path):
    data = small_image(7, 4, zero={0, 3})
    blocks = blocks_of(data)
    session = start(web01, "vol-x", data)
    assert web01.bitmap(session, bitmap_of(blocks)).status_code == 200
    extra = blocks[1] + blocks[2] + blocks[1]
    assert web01.data(session, 1, extra).status_code == 422
    streamed = web01.client.post(
        f"directreplication/slave/{web01.path(session)}/o3edata",
        content=iter([blocks[1], blocks[2], b"x"]),
        headers={"X-O3E-Block-Index": "1"},
    )
    assert streamed.status_code == 422, streamed.text
    assert "beyond the bitmap" in streamed.json()["message"]
    superscript = web01.client.post(  # a digit to str.isdigit() but not to int()
        f"directreplication/slave/{web01.path(session)}/o3edata",
        content=blocks[1],
        headers={"X-O3E-Block-Index": "\u00b2".encode("latin-1")},
    )
    assert superscript.status_code == 422, superscript.text
    assert superscript.json()["field"] == "X-O3E-Block-Index"
    assert query(server, "SELECT count(*) FROM volume_images") == [(0,)]
    assert web01.data(session, 2, blocks[2]).status_code == 409
    done = web01.data(session, 1, blocks[1] + blocks[2])
    assert done.status_code == 200 and done.json()["committed"] is True
    assert export(server, "web01", "vol-x", tmp_path / "out.img") == data


def test_image_without_used_blocks_is_committed_with_its_bitmap(server, web01, tmp_path):
    data = bytes(3 * BS + 10)
    session = start(web01, "vol-z", data)
    answer = web01.bitmap(session, b"\x00")
    assert answer.status_code == 200 and answer.json()["committed"] is True
    assert export(server, "web01", "vol-z", tmp_path / "out.img") == data


def test_other_sources_and_unknown_sessions_are_not_found(server, web01, make_source, admin):
    data = small_image(8, 2, zero=set())
    session = start(web01, "vol-o", data)
    other = make_source("b")
    pair_by_demand(server, other, ["db02"], admin)
    with server.client(other) as client:
        theirs = DirectClient(client, "web01")
        mine = DirectClient(client, "db02")
        for direct in (theirs, mine):
            assert (
                direct.set_file(session, direct.file_body("vol-o", len(data), BS)).status_code
                == 404
            )
            assert direct.bitmap(session, b"\x03").status_code == 404
            assert direct.data(session, 0, data).status_code == 404
            assert direct.file_info(session).status_code == 404
            assert direct.description(session).status_code == 404
        assert theirs.open("vol-o", 2, len(data), BS).status_code == 404
    for unknown in (str(uuid.uuid4()), "not-a-session"):
        assert web01.file_info(unknown).status_code == 404
        assert web01.bitmap(unknown, b"\x03").status_code == 404
    normal = web01.client.post(
        "slave/sessions/new",
        json={
            "agentId": "web01",
            "jobId": "job-d",
            "driverVolumeId": "vol-n",
            "epochNumber": 1,
            "blockSize": BS,
            "size": BS,
            "recoveryPointId": "rp-n",
            "recoveryPointTimestamp": "2026-11-27T10:00:00Z",
            "volumeCount": 1,
        },
    ).json()["sessionId"]
    assert web01.file_info(normal).status_code == 404  # not a direct session
    with server.client() as client:
        assert DirectClient(client, "web01").file_info(session).status_code == 401


def _endpoint(app: Any, path: str, method: str = "GET") -> str | None:
    from werkzeug.exceptions import MethodNotAllowed, NotFound

    prefix = app.extensions["replicore"].config.server.url_prefix + "/replicationcomms/"
    try:
        endpoint, _ = app.url_map.bind("localhost").match(prefix + path, method=method)
    except (NotFound, MethodNotAllowed):
        return None
    return str(endpoint)


def test_direct_routes_do_not_clash_with_the_agent_routes(app):
    sid = str(uuid.uuid4())
    assert _endpoint(app, f"slave/agents/a1/j1/{sid}/fileinfo") == "direct.file_info"
    assert (
        _endpoint(app, f"slave/agents/a1/j1/{sid}/repoconnectiondescription")
        == "direct.repo_connection_description"
    )
    for path, method in (
        ("slave/agents/a1/metadataUpdate/status", "GET"),
        ("slave/agents/a1/replication/verifyStart", "GET"),
        ("slave/agents/a1/skipCount/0/maxCount/10/rps", "GET"),
        ("slave/agents/a1/transferJob/j1", "POST"),
        (f"slave/a1/j1/{sid}/records/keys", "POST"),
        ("slave/a1/vol/3/transferredblocks", "GET"),
    ):
        endpoint = _endpoint(app, path, method)
        assert endpoint is None or not endpoint.startswith("direct."), (path, endpoint)
    assert _endpoint(app, f"directreplication/slave/a1/j1/{sid}", "POST") == "direct.snapshot_file"
    assert (
        _endpoint(app, f"directreplication/slave/a1/j1/{sid}/o3edata", "POST") == "direct.o3e_data"
    )


def test_interrupted_direct_push_resumes_where_the_target_stopped(
    server, source, tmp_path, monkeypatch
):
    from replicore.source import direct as direct_client
    from replicore.source.transport import TargetClient, TransportError

    image = tmp_path / "c.img"
    data = make_image(image, 12, seed=9)
    used = sum(1 for b in blocks_of(data, 64 * KIB) if b.count(0) != len(b))
    monkeypatch.setattr(direct_client, "SEND_BYTES", 64 * KIB)  # one block per request
    original = TargetClient.request
    calls = {"o3edata": 0}

    def cut(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        if path.endswith("/o3edata"):
            calls["o3edata"] += 1
            if calls["o3edata"] == 4:
                raise TransportError("connection cut")
        return original(self, method, path, **kwargs)

    monkeypatch.setattr(TargetClient, "request", cut)
    failed = push(source, server, "web01", {"vol-c": image}, "--direct")
    assert failed.status == 1 and "connection cut" in failed.stderr
    monkeypatch.setattr(TargetClient, "request", original)

    result = push(source, server, "web01", {"vol-c": image}, "--direct").result
    assert result["resumed_run"] is True
    assert result["volumes"][0]["resumed"] is True
    assert result["blocks_sent"] == used - 3
    assert export(server, "web01", "vol-c", tmp_path / "out.img") == data
