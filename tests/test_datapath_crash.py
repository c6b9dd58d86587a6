"""The data path survives SIGKILL: acknowledged records stay, sessions resume, a commit is all
or nothing; and idle sessions expire while their records stay."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import httpx
import pytest

from datapath_helpers import (
    KIB,
    MIB,
    DataPathClient,
    bit,
    key_entries,
    keys_checksum,
    make_image,
    mutate,
    record_batches,
    split,
)
from pairing_helpers import pair_by_demand

BS = 16 * KIB
SMALL = 4 * KIB
ADMIN = ("admin", "correct horse battery")


def query(server: Any, sql: str) -> list[tuple[Any, ...]]:
    conn = apsw.Connection(str(server.database_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [tuple(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def assert_consistent(server: Any) -> None:
    assert query(server, "PRAGMA integrity_check") == [("ok",)]
    assert query(server, "PRAGMA foreign_key_check") == []


def export(server: Any, tmp_path: Path, epoch: int) -> bytes:
    out = tmp_path / f"export-{epoch}.img"
    result = server.cli(
        "export", "--agent", "web01", "--volume", "vol", "--epoch", str(epoch), "-o", str(out)
    )
    assert result.status == 0, result.stderr
    return out.read_bytes()


@pytest.fixture
def paired(server, make_source, admin):
    source = make_source("a")
    pair_by_demand(server, source, ["web01"], admin)
    return source


def test_kill_during_rawdata_keeps_acknowledged_records_and_the_session_resumes(
    server, paired, tmp_path
):
    image = make_image(21, 3 * MIB, BS)
    blocks = split(image, BS)
    entries = key_entries(blocks)
    with server.client(paired) as client:
        web01 = DataPathClient(client, "web01")
        sid = web01.open_ok("vol", 1, len(image), BS)["sessionId"]
        missing = web01.missing(sid, entries)
        batches = record_batches(blocks, missing, max_bytes=256 * KIB)
        assert len(batches) >= 4
        acknowledged = batches[: len(batches) // 2]
        for body in acknowledged:
            assert web01.rawdata(sid, body).status_code == 200
        durable = web01.bitmap(sid).content

    # One more batch is cut in the middle of its body when the server dies.
    in_flight = batches[len(batches) // 2]
    half_sent, killed = threading.Event(), threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield in_flight[: len(in_flight) // 2]
        half_sent.set()
        killed.wait(30)
        yield in_flight[len(in_flight) // 2 :]

    failures: list[BaseException] = []

    def send() -> None:
        try:
            with server.client(paired) as client:
                DataPathClient(client, "web01").rawdata(sid, slow_body())  # type: ignore[arg-type]
        except httpx.HTTPError as error:
            failures.append(error)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    assert half_sent.wait(30)
    server.kill()
    killed.set()
    sender.join(60)
    assert failures  # the cut request never got an answer
    server.start()
    assert_consistent(server)

    with server.client(paired) as client:
        web01 = DataPathClient(client, "web01")
        resumed = web01.open_ok("vol", 1, len(image), BS)
        assert resumed["sessionId"] == sid and resumed["resumed"] is True
        after = web01.bitmap(sid).content
        assert after == durable  # every acknowledged block survived, nothing of the cut one
        assert resumed["transferredBlockCount"] == sum(bit(after, i) for i in range(len(blocks)))
        still_missing = web01.missing(sid, entries)
        assert 0 < len(still_missing) < len(missing)
        web01.send_records(sid, blocks, still_missing)
        done = web01.end(sid, True, len(blocks), keys_checksum(entries))
        assert done.status_code == 200, done.text
    server.kill()  # an answered commit is durable, and poke still knows it after a restart
    server.start()
    with server.client(paired) as client:
        assert DataPathClient(client, "web01").poke(sid).json() is True
    assert export(server, tmp_path, 1) == image


def test_kill_during_commit_leaves_nothing_half_committed(server, paired, tmp_path):
    # 16384 blocks of mostly one record: cheap to send, a commit with real work to do.
    base = bytes(64 * MIB)
    changed = mutate(base, SMALL, range(0, 256, 3), seed=5)
    with server.client(paired) as client:
        web01 = DataPathClient(client, "web01")
        web01.push("vol", 1, base, SMALL)
        blocks = split(changed, SMALL)
        entries = key_entries(blocks)
        sid = web01.open_ok("vol", 2, len(changed), SMALL, previous=1)["sessionId"]
        web01.send_records(sid, blocks, web01.missing(sid, entries))
        started = web01.end(sid, True, len(blocks), keys_checksum(entries), background=True)
        assert started.status_code == 202
    server.kill()
    server.start()
    assert_consistent(server)
    images = query(server, "SELECT epoch_number, stored_block_count FROM volume_images ORDER BY 1")
    open_sessions = query(server, "SELECT session_id FROM sessions")
    points = query(server, "SELECT recovery_point_id, complete FROM recovery_points ORDER BY 1")
    if images == [(1, len(blocks))]:  # killed before the commit's transaction ended
        assert open_sessions == [(sid,)]
        assert points == [("rp-vol-1", 1)]
        with server.client(paired) as client:
            web01 = DataPathClient(client, "web01")
            assert web01.poke(sid).status_code == 409  # not running: end it again
            done = web01.end(sid, True, len(blocks), keys_checksum(entries))
            assert done.status_code == 200, done.text
    else:
        assert images == [(1, len(blocks)), (2, 86)]
        assert open_sessions == []
        assert points == [("rp-vol-1", 1), ("rp-vol-2", 1)]
        with server.client(paired) as client:
            assert DataPathClient(client, "web01").poke(sid).json() is True
    assert export(server, tmp_path, 2) == changed
    assert export(server, tmp_path, 1) == base


def test_idle_sessions_expire_and_their_records_stay(make_server, make_source):
    server = make_server("[replication]\nsession_timeout = 1.0\n")
    assert server.cli("admin", "add", ADMIN[0], "--password-stdin", stdin=ADMIN[1]).status == 0
    source = make_source("a")
    pair_by_demand(server, source, ["web01"], ADMIN)
    blocks = [b"\x01" * BS, b"\x02" * BS]
    with server.client(source) as client:
        web01 = DataPathClient(client, "web01")
        sid = web01.open_ok("vol", 1, 2 * BS, BS)["sessionId"]
        web01.send_records(sid, blocks, web01.missing(sid, key_entries(blocks)))
        deadline = time.monotonic() + 30
        while web01.bitmap(sid).status_code == 200:
            assert time.monotonic() < deadline, "the idle session was never discarded"
            time.sleep(0.2)
        fresh = web01.open_ok("vol", 1, 2 * BS, BS)
        assert fresh["sessionId"] != sid and fresh["resumed"] is False
        assert web01.missing(fresh["sessionId"], key_entries(blocks)) == []
