"""Slow clients: one that never finishes the TLS handshake, its headers, or its body is
disconnected after a timeout, and what it held (connection, file descriptors, an upload
session's lock, a data-path batch) is freed; records received before a stalled record
stream are kept; a refused request is answered at once even while its body is still due.

The real timeouts are a minute or two (TLS handshake 60 s, headers and idle keep-alive 75 s,
a JSON body 120 s, a stalled record stream 60 s; checked in
test_every_wait_for_a_client_is_bounded). The server here runs with the same code and all of
them shortened to TIMEOUT seconds, set by a `sitecustomize` module on its PYTHONPATH (written
below), so the file runs in seconds.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

import authz_helpers as az
from datapath_helpers import frame, key_entries
from replicore import protocol
from replicore.api import sessions
from replicore.app import create_app
from replicore.config import parse
from replicore.daemon import prepare_state
from replicore.runtime import Runtime
from replicore.server import TrustStore, hypercorn_config
from replicore.store.db import Database

TIMEOUT = 1.0
#: Longest wait for the server to act on a slow client (a bound, not a timing assertion).
PATIENCE = 30.0
PREFIX = "/apprecovery/api/core/replicationcomms/"

SITECUSTOMIZE = '''
"""Test-only: shorten the server's waits for slow clients (tests/test_slow_client.py)."""
import os

_seconds = os.environ.get("REPLICORE_TEST_CLIENT_TIMEOUT")
if _seconds:
    _seconds = float(_seconds)
    import replicore.api.direct as _direct
    import replicore.api.sessions as _sessions
    import replicore.app as _app
    import replicore.server as _server

    _create_app, _hypercorn_config = _app.create_app, _server.hypercorn_config

    def create_app(runtime):
        app = _create_app(runtime)
        app.config["BODY_TIMEOUT"] = _seconds
        return app

    def hypercorn_config(*args, **kwargs):
        config = _hypercorn_config(*args, **kwargs)
        config.keep_alive_timeout = config.ssl_handshake_timeout = _seconds
        return config

    _app.create_app, _server.hypercorn_config = create_app, hypercorn_config
    _sessions.BODY_IDLE_TIMEOUT = _direct.BODY_IDLE_TIMEOUT = _seconds
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "REPLICORE_TEST_CLIENT_TIMEOUT": str(TIMEOUT),
    }
    with az.module_server(root / "server", az.MATRIX_CONFIG, env=env) as server:
        yield az.build_world(root, server)


def host_port(world: az.World) -> tuple[str, int]:
    host, _, port = world.server.url.removeprefix("https://").rstrip("/").partition(":")
    return host, int(port)


@contextlib.contextmanager
def raw_tls(world: az.World, source=None) -> Iterator[ssl.SSLSocket]:
    """A bare TLS connection (with `source`'s certificate), for sending partial requests."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=world.server.pem)
    if source is not None:
        context.load_cert_chain(str(source.cert_path), str(source.key_path))
    host, port = host_port(world)
    with (
        socket.create_connection((host, port)) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        yield tls


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (PATIENCE at most)."""
    sock.settimeout(PATIENCE)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            return received
        if not chunk:
            return received
        received += chunk


def head(method: str, path: str, length: int, **headers: str) -> bytes:
    lines = [f"{method} {PREFIX}{path} HTTP/1.1", "Host: replicore", f"Content-Length: {length}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def open_fds(world: az.World) -> int:
    assert world.server.proc is not None
    return len(os.listdir(f"/proc/{world.server.proc.pid}/fd"))


# --------------------------------------------------------------------------


def test_every_wait_for_a_client_is_bounded(tmp_path):
    """The unshortened values: each wait on a client has a finite limit."""
    config = parse({"server": {"state_dir": str(tmp_path), "listen": "127.0.0.1:0"}})
    core_id, cert, key = prepare_state(config)
    db = Database(config.database_path, readers=1)
    try:
        runtime = Runtime(
            config=config,
            db=db,
            trust=TrustStore(cert, key),
            core_id=core_id,
            server_fingerprint="",
        )
        body_timeout = create_app(runtime).config["BODY_TIMEOUT"]
    finally:
        db.close()
    server = hypercorn_config("127.0.0.1", 0, 5.0)
    for name, value in (
        ("JSON body", body_timeout),
        ("record stream idle", sessions.BODY_IDLE_TIMEOUT),
        ("TLS handshake", server.ssl_handshake_timeout),
        ("headers and keep-alive", server.keep_alive_timeout),
    ):
        assert value is not None and 0 < value < math.inf and value <= 300, (name, value)


def test_a_client_that_never_starts_tls_is_disconnected(world):
    host, port = host_port(world)
    with socket.create_connection((host, port)) as raw:
        assert read_until_closed(raw) == b""


def test_a_client_that_never_finishes_its_headers_is_disconnected(world):
    with raw_tls(world) as tls:
        tls.sendall(f"POST {PREFIX}slave/pairing/request HTTP/1.1\r\nHost: x\r\n".encode())
        assert read_until_closed(tls) == b""


def test_a_client_that_never_finishes_its_json_body_gets_408_and_is_disconnected(world):
    before = az.snapshot(world.server)
    with raw_tls(world, world.a.source) as tls:
        tls.sendall(head("POST", "slave/sessions/new", 400, Content_Type="application/json"))
        tls.sendall(b'{"agentId": "a-web01",')
        answer = read_until_closed(tls)
    assert status_of(answer) == 408, answer
    assert b'"error":"request_timeout"' in answer
    assert az.snapshot(world.server) == before


def test_a_refused_request_is_answered_at_once_while_its_body_is_still_due(world):
    """No certificate: 401 and the connection closed, without waiting for the body."""
    with raw_tls(world) as tls:
        tls.sendall(head("POST", "slave/sessions/new", 10_000_000, Content_Type="application/json"))
        answer = read_until_closed(tls)
    assert status_of(answer) == 401, answer


def test_a_stalled_record_stream_is_given_up_and_keeps_the_records_before_it(world):
    blocks = [bytes([i + 7]) * az.BS for i in range(4)]
    sid = world.open_session(world.a)
    path = f"slave/{world.a.agent}/{world.a.job}/{sid}"
    with world.client(world.a.source) as c:
        announced = c.post(
            f"{path}/records/keys", content=protocol.encode_keys(key_entries(blocks))
        )
        assert protocol.decode_missing(announced.content) == [0, 1, 2, 3]
    first = protocol.encode_records_header(4) + frame(0, blocks[0])
    with raw_tls(world, world.a.source) as tls:
        tls.sendall(head("POST", f"{path}/records/rawdata", len(first) + 10 * az.BS))
        tls.sendall(first)
        answer = read_until_closed(tls)
    assert status_of(answer) == 400, answer
    assert b"stalled" in answer and b'"stored":1' in answer
    with world.client(world.a.source) as c:
        bitmap = c.get(f"slave/sessions/{sid}/transferredblocks").content
        assert bitmap[0] & 1 == 1  # block 0 is durable
        # The session goes on: the other records arrive and it commits.
        rest = protocol.encode_records_header(3) + b"".join(frame(i, blocks[i]) for i in (1, 2, 3))
        assert c.post(f"{path}/records/rawdata", content=rest).json()["stored"] == 3


def test_a_stalled_upload_chunk_frees_its_session_for_the_retry(world):
    upload = world.open_upload(world.a)
    with raw_tls(world, world.a.source) as tls:
        tls.sendall(head("POST", f"slave/sessions/{upload}/data/8", 8, X_Upload_Offset="0"))
        tls.sendall(b"1234")
        answer = read_until_closed(tls)
    assert status_of(answer) == 408, answer
    with world.client(world.a.source) as c:
        retry = c.post(
            f"slave/sessions/{upload}/data/8", content=b"12345678", headers={"X-Upload-Offset": "0"}
        )
    assert retry.status_code == 200, retry.text
    assert retry.json()["received"] == 8


def test_many_slow_clients_at_once_are_all_dropped_and_their_descriptors_freed(world):
    with world.client(world.a.source) as c:  # warm up: the server's own descriptors settle
        assert c.get("slave/repositories").status_code == 200
    baseline = open_fds(world)
    host, port = host_port(world)
    held: list[socket.socket] = []
    with contextlib.ExitStack() as stack:
        for i in range(30):
            kind = i % 3
            if kind == 0:  # never starts TLS
                held.append(stack.enter_context(socket.create_connection((host, port))))
            else:
                tls = stack.enter_context(raw_tls(world, world.a.source))
                if kind == 1:  # headers cut
                    tls.sendall(f"GET {PREFIX}slave/agents HTTP/1.1\r\n".encode())
                else:  # body never finished
                    tls.sendall(head("PUT", "slave/storage", 1000, Content_Type="application/json"))
                    tls.sendall(b'{"agents": [')
                held.append(tls)
        # They hold descriptors (the first ones may already be dropped by now).
        assert open_fds(world) > baseline + len(held) // 2
        for sock in held:
            read_until_closed(sock)
    deadline = time.monotonic() + PATIENCE
    while open_fds(world) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(world) <= baseline
    with world.client(world.a.source) as c:
        assert c.get("slave/repositories").status_code == 200
