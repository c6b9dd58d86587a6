"""The push client's HTTP transport (source/transport.py) against a small TLS HTTP/1.1 server
in this process: bodies sent without a copy, pooled keep-alive connections, the wire counter,
retries, the pinned and the client certificate, the rate limiter's hook."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from replicore import certs
from replicore.source import transport
from replicore.source.identity import Identity
from replicore.source.transport import PinMismatch, TargetClient, TransportError

API = "/apprecovery/api/core/replicationcomms/"


@dataclass
class Seen:
    """A request as the test server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer_fingerprint: str | None


#: A test's answer to a request: (status, headers, body), or None to close without answering.
Handler = Callable[[Seen], "tuple[int, dict[str, str], bytes] | None"]


def echo(seen: Seen) -> tuple[int, dict[str, str], bytes]:
    body = {"length": len(seen.body), "sha256": hashlib.sha256(seen.body).hexdigest()}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


@dataclass
class Target:
    """The test server: its URL, certificate, the requests it saw, and how it answers."""

    url: str
    pem: str
    seen: list[Seen] = field(default_factory=list)
    handler: Handler = echo
    close_after_answer: bool = False


def _handler_class(target: Target) -> type[BaseHTTPRequestHandler]:
    class Handle(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            der = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
            seen = Seen(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                self.rfile.read(length),
                certs.fingerprint_der(der) if der else None,
            )
            target.seen.append(seen)
            answer = target.handler(seen)
            if answer is None:
                self.close_connection = True
                return
            status, headers, body = answer
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = target.close_after_answer

        do_GET = do_POST = do_DELETE = _any

    return Handle


class _QuietServer(ThreadingHTTPServer):
    """Some tests drop the connection on purpose: the server's side of it is not an error."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], (OSError, ssl.SSLError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _serve(tmp: Path, client_ca: str | None = None) -> Iterator[Target]:
    cert_pem, key_pem = certs.make_self_signed("test target", server=True)
    (tmp / "target.crt").write_bytes(cert_pem)
    (tmp / "target.key").write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp / "target.crt", tmp / "target.key")
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca)
    target = Target("", cert_pem.decode())
    server = _QuietServer(("127.0.0.1", 0), _handler_class(target))
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    target.url = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield target
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    yield from _serve(tmp_path)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "_backoff", lambda attempt: 0.0)


def test_a_request_reaches_the_api_path_with_its_host_and_body(target: Target) -> None:
    with TargetClient(target.url, target.pem, None) as client:
        answer = client.request("POST", "slave/x/records/keys?commit=true", content=b"abc")
    assert answer.status == 200 and answer.json()["length"] == 3
    assert answer.headers["content-type"] == "application/json"
    (seen,) = target.seen
    assert (seen.method, seen.path) == ("POST", API + "slave/x/records/keys?commit=true")
    assert seen.headers["host"] == target.url.removeprefix("https://")
    assert seen.headers["content-type"] == "application/octet-stream"
    assert seen.body == b"abc"


def test_a_json_body_is_sent_compact_and_typed(target: Target) -> None:
    with TargetClient(target.url, target.pem, None) as client:
        client.request("POST", "slave/sessions/new", json_body={"a": [1, 2]})
        client.request("GET", "slave/sessions/1/transferredblocks")
    posted, got = target.seen
    assert posted.body == b'{"a":[1,2]}' and posted.headers["content-type"] == "application/json"
    assert got.body == b"" and "content-length" not in got.headers


def test_a_body_given_as_bytes_goes_to_tls_without_a_copy(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB
    handed: list[Any] = []
    write = transport._TLSStream.write

    def spy(self: Any, buffers: Any) -> None:
        buffers = list(buffers)
        handed.extend(buffers)
        write(self, buffers)

    monkeypatch.setattr(transport._TLSStream, "write", spy)
    with TargetClient(target.url, target.pem, None) as client:
        answer = client.request("POST", "slave/x/records/rawdata", content=body)
    assert answer.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert any(isinstance(b, memoryview) and b.obj is body for b in handed)
    assert sum(memoryview(b).nbytes for b in handed) < len(body) + 1024  # the head only


def test_a_body_in_pieces_is_sent_in_order_with_their_total_length(target: Target) -> None:
    pieces = [b"head:", memoryview(b"middle"), bytearray(b""), bytearray(b":tail")]
    with TargetClient(target.url, target.pem, None) as client:
        client.request("POST", "p", content=pieces)
        small, large = b"s" * 49, bytes(range(256)) * 1024
        many = [small, large, small, small, large[:5000], large, *[small] * 400, large]
        client.request("POST", "p", content=many)
    first, second = target.seen
    assert first.body == b"head:middle:tail" and first.headers["content-length"] == "16"
    assert second.body == b"".join(many)


def test_sequential_requests_share_one_keep_alive_connection(target: Target) -> None:
    with TargetClient(target.url, target.pem, None) as client:
        for n in range(10):
            assert client.request("POST", "p", content=b"x" * n).status == 200
    assert client.counter.connections == 1


def test_concurrent_callers_get_a_connection_each_up_to_the_pool_size(target: Target) -> None:
    together = threading.Barrier(2, timeout=30)

    def hold(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        together.wait()  # two requests in flight at once, each on its own connection
        return echo(seen)

    target.handler = hold
    with TargetClient(target.url, target.pem, None, connections=2) as client:
        answers: list[int] = []
        threads = [
            threading.Thread(target=lambda: answers.append(client.request("GET", "p").status))
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert answers == [200] * 6
    assert client.counter.connections == 2


def test_a_connection_the_target_closed_while_idle_is_replaced(
    target: Target, no_backoff: None
) -> None:
    target.close_after_answer = True  # closes without saying so in a header
    with TargetClient(target.url, target.pem, None) as client:
        for _ in range(3):
            assert client.request("GET", "p").status == 200
    assert client.counter.connections == 3
    assert len(target.seen) == 3


def test_503_is_retried_after_the_time_the_target_names(target: Target) -> None:
    answers = iter([(503, {"Retry-After": "0"}, b"busy"), (200, {}, b"ok")])
    target.handler = lambda seen: next(answers)
    with TargetClient(target.url, target.pem, None) as client:
        answer = client.request("POST", "p", content=b"again")
    assert (answer.status, answer.body) == (200, b"ok")
    assert [s.body for s in target.seen] == [b"again", b"again"]


def test_a_target_that_never_answers_is_taken_for_one_that_refuses_this_source(
    target: Target, no_backoff: None
) -> None:
    target.handler = lambda seen: None
    with (
        TargetClient(target.url, target.pem, None) as client,
        pytest.raises(TransportError, match="does not accept this source's certificate"),
    ):
        client.request("GET", "p")
    assert len(target.seen) == 2


def test_an_unanswered_request_is_retried_then_named(target: Target, no_backoff: None) -> None:
    target.handler = lambda seen: None
    with TargetClient(target.url, target.pem, None, attempts=1) as client:
        with pytest.raises(TransportError, match="disconnected without sending a response"):
            client.request("GET", "p")
        target.handler = echo
        assert client.request("GET", "p").status == 200


def test_another_certificate_than_the_pinned_one_is_refused_at_once(target: Target) -> None:
    other, _ = certs.make_self_signed("impostor", server=True)
    with (
        TargetClient(target.url, other.decode(), None) as client,
        pytest.raises(PinMismatch, match="certificate other than the pinned one"),
    ):
        client.request("GET", "p")
    assert client.counter.connections == 1  # not retried


def test_the_source_presents_its_client_certificate(
    make_source: Callable[..., Identity], tmp_path: Path
) -> None:
    source = make_source("transport")
    for target in _serve(tmp_path, client_ca=source.certificate_pem):
        with TargetClient(target.url, target.pem, source) as client:
            assert client.request("GET", "p").status == 200
        assert target.seen[0].peer_fingerprint == source.fingerprint


def test_an_unreachable_target_is_named(target: Target, no_backoff: None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with (
        TargetClient(f"https://127.0.0.1:{port}", target.pem, None, attempts=2) as client,
        pytest.raises(TransportError, match=f"cannot connect to 127.0.0.1:{port}"),
    ):
        client.request("GET", "p")


def test_a_silent_target_times_out(target: Target) -> None:
    release = threading.Event()

    def stall(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        release.wait(30)
        return echo(seen)

    target.handler = stall
    try:
        with (
            TargetClient(target.url, target.pem, None, read_timeout=0.2, attempts=1) as client,
            pytest.raises(TransportError, match="timed out waiting for the target"),
        ):
            client.request("GET", "p")
    finally:
        release.set()


class _Proxy:
    """A TCP relay to `port` that counts the bytes each way."""

    def __init__(self, port: int) -> None:
        self.up = self.down = 0
        self._port = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pumps: list[threading.Thread] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self._port))
            for src, dst, way in ((near, far, "up"), (far, near, "down")):
                pump = threading.Thread(target=self._pump, args=(src, dst, way), daemon=True)
                self._pumps.append(pump)
                pump.start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:  # counted before it is passed on
                    setattr(self, way, getattr(self, way) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def finish(self) -> None:
        for pump in list(self._pumps):
            pump.join(30)
        self._listener.close()


def test_the_wire_counter_counts_every_byte_on_the_tcp_connections(target: Target) -> None:
    proxy = _Proxy(int(target.url.rsplit(":", 1)[1]))
    url = f"https://127.0.0.1:{proxy.port}"
    body = bytes(range(256)) * 4096
    with TargetClient(url, target.pem, None, connections=2) as client:
        client.request("POST", "p", content=body)
        client.request("GET", "p")
        received = proxy.down  # the server's TLS layer may say goodbye once the client left
    proxy.finish()
    assert client.counter.sent == proxy.up > len(body)
    assert client.counter.received == received > 0


class _Bucket:
    """A rate limiter that records what it is asked for instead of waiting."""

    piece_size = 16 * 1024

    def __init__(self) -> None:
        self.taken: list[int] = []
        self._lock = threading.Lock()

    def acquire(self, amount: int) -> None:
        with self._lock:
            self.taken.append(amount)


def test_every_byte_sent_passes_the_rate_limiter_in_small_pieces(target: Target) -> None:
    bucket = _Bucket()
    body = bytes(range(256)) * 1024
    client = TargetClient(target.url, target.pem, None, bucket=bucket)  # type: ignore[arg-type]
    with client:
        client.request("POST", "p", content=body)
    assert sum(bucket.taken) == client.counter.sent > len(body)
    # one piece of plaintext and its TLS framing at most (a record: 5 + 16 + 1 bytes more)
    assert max(bucket.taken) <= bucket.piece_size + 64
