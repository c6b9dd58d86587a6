"""The bulk gate lets at most `limit` bulk bodies into the app at once; others wait before
the app (so their bytes stay in TCP) and control requests never wait."""

from __future__ import annotations

import trio
import trio.testing

from replicore.app import BulkGate
from replicore.server import BULK_READ_SIZE, READ_SIZE_KEY, SOCKET_READ_SIZE, ReadSize

RAWDATA = "/apprecovery/api/core/replicationcomms/slave/a/j/s/records/rawdata"


async def test_bulk_requests_beyond_the_limit_wait_and_control_requests_do_not():
    inside: list[str] = []
    peak = 0
    release = trio.Event()

    async def app(scope, receive, send):
        nonlocal peak
        inside.append(scope["path"])
        peak = max(peak, sum(p.endswith("rawdata") for p in inside))
        if scope["path"].endswith("rawdata"):
            await release.wait()
        inside.remove(scope["path"])

    gate = BulkGate(app, limit=2)
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(gate, {"type": "http", "path": RAWDATA}, None, None)
        await trio.testing.wait_all_tasks_blocked()
        assert sum(p.endswith("rawdata") for p in inside) == 2
        with trio.fail_after(5):
            await gate({"type": "http", "path": "/x/slave/agents"}, None, None)
        release.set()
    assert peak == 2 and inside == []


def test_bulk_paths_are_the_record_batches_o3edata_and_upload_chunks():
    bulk = BulkGate.BULK_PATH
    assert bulk.search(RAWDATA)
    assert bulk.search("/p/directreplication/slave/a/j/s/o3edata")
    assert bulk.search("/p/slave/sessions/0b7c1b6e-5f8a-4a57-9d5e-2f1f4f0e9a11/data/4096")
    assert not bulk.search("/p/slave/a/j/s/records/keys")
    assert not bulk.search("/p/slave/sessions/new")


async def test_an_admitted_bulk_body_reads_in_large_pieces_until_it_is_done():
    read_size = ReadSize()
    seen: dict[str, int] = {}

    async def app(scope, receive, send):
        seen[scope["path"]] = read_size.bytes

    gate = BulkGate(app, limit=1)
    for path in (RAWDATA, "/x/slave/agents"):
        await gate(
            {"type": "http", "path": path, "extensions": {READ_SIZE_KEY: read_size}}, None, None
        )
    assert seen == {RAWDATA: BULK_READ_SIZE, "/x/slave/agents": SOCKET_READ_SIZE}
    assert read_size.bytes == SOCKET_READ_SIZE
