"""Bad input against the real server: the OpenAPI document (served, complete, with the
handlers' own body types), a bounded property-based fuzz run of every operation generated
from it (no 5xx, no hang, no database change after a 4xx; fuzz_helpers), and hand-written
binary bodies for the data path (truncated frames, lengths past the end, giant length
fields, duplicate block indices, zero-length bodies, records that do not match their key),
each refused with a clear 4xx that changes nothing.

The fuzz budget is FUZZ_SECONDS (env REPLICORE_FUZZ_SECONDS); tests/long/fuzz_api.py runs
the same for as long as asked.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import msgspec
import pytest

import authz_helpers as az
import fuzz_helpers
from datapath_helpers import frame, key_entries, records_body
from replicore import openapi, protocol
from replicore.api.openapi import REQUESTS

FUZZ_SECONDS = float(os.environ.get("REPLICORE_FUZZ_SECONDS", "60"))
EXAMPLES = 20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    with az.module_server(root / "server", az.MATRIX_CONFIG) as server:
        yield az.build_world(root, server)


@pytest.fixture(scope="module")
def document(world) -> dict[str, Any]:
    with world.client() as c:  # anonymous
        response = c.get("openapi.json")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    found: dict[str, Any] = response.json()
    return found


# --------------------------------------------------------------------------
# The OpenAPI document
# --------------------------------------------------------------------------


def operation_of(document: dict[str, Any], method: str, path: str) -> dict[str, Any] | None:
    for candidate, item in document["paths"].items():
        operation = item.get(method.lower())
        if operation is None:
            continue
        names = [candidate, *operation.get("x-replicore-aliases", [])]
        if any(n.rstrip("/") == path.rstrip("/") for n in names):
            found: dict[str, Any] = operation
            return found
    return None


def test_openapi_document_is_valid_and_names_every_seed_operation_with_its_level(document):
    assert document["openapi"].startswith("3.1")
    fuzz_helpers.schemathesis.openapi.from_dict(document)  # parses and resolves
    for (method, seed_path), (level, _) in az.MATRIX.items():
        operation = operation_of(document, method, "/" + seed_path.split("?")[0])
        assert operation is not None, f"{method} {seed_path} is not in the document"
        assert operation["x-replicore-access"] == level.removesuffix("+admin")
        schemes = {name for s in operation["security"] for name in s}
        if level.endswith("+admin") or level == "admin":
            assert "adminBasic" in schemes, (method, seed_path)
        if level in ("known_source", "paired_source", "paired_source+admin"):
            assert "clientCertificate" in schemes, (method, seed_path)
    ops = [op for item in document["paths"].values() for op in item.values()]
    assert len({op["operationId"] for op in ops}) == len(ops)


def test_every_route_of_the_app_is_in_the_document(app, document):
    root = app.extensions["replicore"].config.server.url_prefix + "/replicationcomms"
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(root + "/"):
            continue
        path, _ = openapi.openapi_path(rule.rule.removeprefix(root))
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert operation_of(document, method, path) is not None, (method, path)


def test_every_post_and_put_route_declares_its_request(app):
    """A new POST/PUT route must say in api/openapi.py what it reads (NO_BODY if nothing)."""
    root = app.extensions["replicore"].config.server.url_prefix + "/replicationcomms/"
    endpoints = {r.endpoint for r in app.url_map.iter_rules() if r.rule.startswith(root)}
    written = {
        r.endpoint
        for r in app.url_map.iter_rules()
        if r.rule.startswith(root) and r.methods & {"POST", "PUT"}
    }
    assert written <= set(REQUESTS), sorted(written - set(REQUESTS))
    assert set(REQUESTS) <= endpoints, sorted(set(REQUESTS) - endpoints)
    for endpoint, spec in REQUESTS.items():
        if spec.body is not None:
            assert issubclass(openapi.resolve(spec.body), msgspec.Struct), endpoint


def test_body_schemas_are_the_json_schemas_of_the_decoding_structs(document):
    operation = operation_of(document, "POST", "/slave/sessions/new")
    assert operation is not None
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["properties"]["epochNumber"] == {
        "type": "integer",
        "minimum": 0,
        "maximum": 2**32 - 1,
    }
    assert "agentId" in schema["required"] and "previousEpochNumber" not in schema["required"]
    keys = operation_of(document, "POST", "/slave/{agentId}/{jobId}/{sessionId}/records/keys")
    assert keys is not None and "application/octet-stream" in keys["requestBody"]["content"]
    upload = operation_of(document, "POST", "/slave/sessions/{uploadSessionId}/data/{dataSize}")
    assert upload is not None
    params = {p["name"]: p for p in upload["parameters"]}
    assert params["uploadSessionId"]["schema"]["format"] == "uuid"
    assert params["X-Upload-Offset"]["in"] == "header" and params["X-Upload-Offset"]["required"]


# --------------------------------------------------------------------------
# Hand-written binary bodies of the data path
# --------------------------------------------------------------------------

BS = az.BS
BLOCKS = [bytes([i + 1]) * BS for i in range(4)]


def _keys(entries: list[Any], count: int | None = None) -> bytes:
    body = protocol.encode_keys(entries)
    if count is not None:
        body = body[:4] + struct.pack(">I", count) + body[8:]
    return body


KEY_BODIES = {
    "zero-length body": b"",
    "header cut short": protocol.encode_keys(key_entries(BLOCKS))[:6],
    "entry cut short": protocol.encode_keys(key_entries(BLOCKS))[:-5],
    "count past the entries present": _keys(key_entries(BLOCKS), 9),
    "giant count": _keys([], 2**32 - 1),
    "trailing garbage": protocol.encode_keys(key_entries(BLOCKS)) + b"\x00" * 7,
    "duplicate block index": protocol.encode_keys(key_entries(BLOCKS, [0, 1, 1])),
    "block index past the image": protocol.encode_keys(
        [protocol.KeyEntry(4, protocol.record_key(BLOCKS[0]), BS)]
    ),
    "wrong magic": b"XXXX" + protocol.encode_keys(key_entries(BLOCKS))[4:],
}


def _frame_header(index: int, raw_length: int, stored: int, codec: int) -> bytes:
    """A bare RRD1 frame header (docs/protocol.md: index, key, raw length, stored, codec)."""
    return struct.pack(">Q32sIIB", index, protocol.record_key(BLOCKS[0]), raw_length, stored, codec)


RECORD_BODIES = {
    "zero-length body": b"",
    "header cut short": records_body([frame(0, BLOCKS[0])])[:5],
    "frame header cut short": records_body([frame(0, BLOCKS[0])])[:20],
    "length past the end of the body": records_body([frame(0, BLOCKS[0], compress=False)])[:-100],
    "giant stored length": protocol.encode_records_header(1)
    + _frame_header(0, BS, 2**32 - 1, protocol.CODEC_ZSTD),
    "giant raw length": protocol.encode_records_header(1)
    + _frame_header(0, 2**32 - 1, 2**32 - 1, protocol.CODEC_RAW),
    "giant count": protocol.encode_records_header(1)[:4] + struct.pack(">I", 2**32 - 1),
    "count past the frames present": protocol.encode_records_header(3) + frame(0, BLOCKS[0]),
    "record that does not match its key": records_body(
        [frame(0, BLOCKS[0], key=protocol.record_key(BLOCKS[1]))]
    ),
    "block index past the image": records_body([frame(7, BLOCKS[0])]),
}


@pytest.fixture
def fresh_session(world):
    """A new session of A's agent (4 blocks) with all four keys announced."""
    sid = world.open_session(world.a)
    path = f"slave/{world.a.agent}/{world.a.job}/{sid}"
    with world.client(world.a.source) as c:
        announced = c.post(
            f"{path}/records/keys", content=protocol.encode_keys(key_entries(BLOCKS))
        )
    assert announced.status_code == 200, announced.text
    return path


@pytest.mark.parametrize("name", sorted(KEY_BODIES))
def test_bad_key_list_is_refused_with_a_clear_error_and_changes_nothing(world, name):
    sid = world.open_session(world.a)
    before = az.snapshot(world.server)
    with world.client(world.a.source) as c:
        response = c.post(
            f"slave/{world.a.agent}/{world.a.job}/{sid}/records/keys",
            content=KEY_BODIES[name],
            headers={"Content-Type": "application/octet-stream"},
        )
    assert response.status_code in (400, 413, 422), response.text
    assert response.json()["error"] and response.json()["message"]
    assert az.snapshot(world.server) == before


#: Bodies whose complete frames before the error are kept (docs/api/datapath.md).
KEPT = {"count past the frames present": 1}
#: A refused batch still counts as activity of its session (its idle-expiry clock).
ACTIVITY = {"sessions": {"last_activity_at"}}


@pytest.mark.parametrize("name", sorted(RECORD_BODIES))
def test_bad_record_stream_is_refused_with_a_clear_error_and_stores_nothing(
    world, fresh_session, name
):
    before = az.snapshot(world.server, ACTIVITY)
    with world.client(world.a.source) as c:
        response = c.post(
            f"{fresh_session}/records/rawdata",
            content=RECORD_BODIES[name],
            headers={"Content-Type": "application/octet-stream"},
        )
    assert response.status_code in (400, 413, 422), response.text
    body = response.json()
    assert body["error"] and body["message"]
    assert body.get("stored", 0) == KEPT.get(name, 0)
    if name not in KEPT:
        assert az.snapshot(world.server, ACTIVITY) == before


def test_a_record_sent_twice_in_one_batch_is_stored_once(world, fresh_session):
    with world.client(world.a.source) as c:
        response = c.post(
            f"{fresh_session}/records/rawdata",
            content=records_body([frame(0, BLOCKS[0]), frame(0, BLOCKS[0])]),
            headers={"Content-Type": "application/octet-stream"},
        )
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        assert response.json()["stored"] + response.json()["alreadyPresent"] == 2
        assert response.json()["stored"] <= 1


def test_an_upload_over_the_file_limit_is_a_client_error_not_a_full_disk(world):
    before = az.snapshot(world.server)
    with world.client(world.a.source) as c:
        response = c.post(
            "slave/newsession/",
            json={"fileName": "ese.dll", "size": 2**62, "md5": "0" * 32, "purpose": "exchange-dll"},
        )
    assert az.snapshot(world.server) == before
    assert response.status_code == 413, response.text


# --------------------------------------------------------------------------
# The fuzz run (last: it may unpair source A and delete its agent at its end)
# --------------------------------------------------------------------------


def test_fuzzed_requests_get_no_5xx_no_hang_and_change_nothing_when_refused(world, document):
    _, schema = fuzz_helpers.load_schema(world.server)
    with fuzz_helpers.fuzzing(world, FUZZ_SECONDS) as fuzzer:
        fuzzer.fuzz(schema, document, EXAMPLES, ("positive", "negative"))
    stats = fuzzer.stats
    print(f"\nfuzz: {stats.requests} requests, statuses {dict(sorted(stats.statuses.items()))}")
    print(f"fuzz: {len(stats.per_endpoint)} operations: {sorted(stats.per_endpoint.items())}")
    operations = sum(len(item) for item in document["paths"].values())
    assert len(stats.per_endpoint) == operations, "the fuzz run did not reach every operation"
    assert stats.requests > 300, "the fuzz run sent too few requests to mean anything"
    assert not fuzzer.findings, "\n\n".join(map(str, fuzzer.findings[:20]))
