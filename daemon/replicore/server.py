"""Hypercorn on trio with TLS: the listening sockets, the live trust store, the peer certificate.

Hypercorn does not put the TLS peer certificate into the ASGI scope. `PeerCertTCPServer`
finishes the handshake itself, reads the client certificate, and hands every request of that
connection a scope with `extensions["tls"]` holding `client_cert_chain` (PEM, as the ASGI TLS
extension names it) and `client_cert_fingerprint` (SHA-256 hex). `serve()` replaces
`hypercorn.trio.serve` so that our TCP server and our SSL context are used; it touches
Hypercorn internals, hence the pinned version range in pyproject.toml.

Bulk uploads arrive as 16 KiB TLS records, and each record would otherwise travel through
trio, h11, Hypercorn and Quart on its own. The server reads up to `ReadSize.bytes` of
ciphertext per system call and hands on, per event, all the plaintext that those bytes
already decrypt to (`drain_decrypted`, up to as much): the same bytes in far fewer events.
A connection reads `SOCKET_READ_SIZE` at a time, and `BULK_READ_SIZE` while the bulk gate
(`app.BulkGate`) lets a bulk body of it into the app: the requests that wait at the gate keep
small buffers, the few admitted ones cost less CPU per byte.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from . import body_buffer
from .certs import fingerprint_der

log = logging.getLogger("replicore.server")

# 256 KiB: half the server's memory of 1 MiB with 80 connections pushing at once
# (bench/LOAD.md). 1 MiB for an admitted bulk body (at most server.max_bulk_requests at once):
# 0.3-0.4 s less of the server's CPU per GiB received, 85 MiB more at the peak of the
# 20-source load test.
SOCKET_READ_SIZE = 256 * 1024
BULK_READ_SIZE = 1024 * 1024
#: The scope extension holding the connection's `ReadSize`.
READ_SIZE_KEY = "replicore.read_size"
#: The most plaintext one TLS record carries: what one read of the SSL object can return.
TLS_RECORD_BYTES = 16 * 1024
IDLE_POLL = 0.05


class ReadSize:
    """How many bytes one connection reads per system call and hands on per event."""

    def __init__(self) -> None:
        self.bytes = SOCKET_READ_SIZE


class TrustStore:
    """The server SSL context and the client certificates it trusts, changeable while live.

    Adding a certificate affects the next handshake. Certificates cannot be removed from a
    live OpenSSL store: a removed (unpaired) certificate is refused by the application, by
    fingerprint, and disappears from the store at the next start."""

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        self.cert_path, self.key_path = cert_path, key_path
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.options |= ssl.OP_NO_COMPRESSION
        self.context.set_alpn_protocols(["http/1.1"])
        self.context.load_cert_chain(str(cert_path), str(key_path))
        self.context.verify_mode = ssl.CERT_OPTIONAL
        self._known: set[str] = set()

    def add(self, pem: str) -> None:
        if pem in self._known:
            return
        self.context.load_verify_locations(cadata=pem)
        self._known.add(pem)

    def reload_certificate(self) -> None:
        """Re-read the server certificate and key (for SIGHUP); new handshakes use them."""
        self.context.load_cert_chain(str(self.cert_path), str(self.key_path))


class _ScopeWithPeer:
    """Wraps Hypercorn's app wrapper, adding the connection's peer certificate to each scope,
    and counting the connection's requests in progress (`active`)."""

    def __init__(self, app: Any, tls: dict[str, Any], read_size: ReadSize) -> None:
        self.app, self.tls, self.read_size = app, tls, read_size
        self.active = 0

    async def __call__(self, scope: Any, receive: Any, send: Any, *args: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            extensions = dict(scope.get("extensions") or {})
            extensions["tls"] = self.tls
            extensions[READ_SIZE_KEY] = self.read_size
            scope = {**scope, "extensions": extensions}
        self.active += 1
        try:
            await self.app(scope, receive, send, *args)
        finally:
            self.active -= 1


def peer_tls_info(der: bytes | None) -> dict[str, Any]:
    if not der:
        return {"client_cert_chain": [], "client_cert_fingerprint": None}
    return {
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)],
        "client_cert_fingerprint": fingerprint_der(der),
    }


class PeerCertTCPServer(TCPServer):
    #: The connection's read size (None until its TLS handshake is done).
    read_size: ReadSize | None = None

    async def run(self) -> None:
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                await stream.aclose()
                return
            der = stream.getpeercert(binary_form=True)
            self.read_size = getattr(stream.transport_stream, "read_size", None) or ReadSize()
            self.app = _ScopeWithPeer(self.app, peer_tls_info(der), self.read_size)
        await super().run()  # its own do_handshake() returns at once now

    async def _read_data(self) -> None:
        """Hypercorn's read loop, handing on all plaintext already decryptable per event, and
        ending once the server stops and the connection has no request in progress (a
        keep-alive connection would otherwise hold shutdown for its whole grace time). Its
        HTTP/1.1 parser hands request bodies on uncopied (`body_buffer`)."""
        body_buffer.install(getattr(getattr(self.protocol, "protocol", None), "connection", None))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._end_when_stopping_and_idle, nursery.cancel_scope)
            while True:
                try:
                    with trio.fail_after(self.config.read_timeout or math.inf):
                        data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                if data and self.read_size is not None:
                    data = drain_decrypted(self.stream, data, self.read_size.bytes)
                await self.protocol.handle(RawData(bytes(data)))
                if data == b"":
                    break
            nursery.cancel_scope.cancel()
        await self.protocol.handle(Closed())

    async def _end_when_stopping_and_idle(self, reading: trio.CancelScope) -> None:
        await self.context.terminated.wait()
        while isinstance(self.app, _ScopeWithPeer) and self.app.active:
            await trio.sleep(IDLE_POLL)
        reading.cancel()


def drain_decrypted(stream: trio.SSLStream[Any], first: bytes | bytearray, limit: int) -> bytes:
    """`first` plus the plaintext that the ciphertext trio has already read decrypts to, up
    to `limit` bytes in all, without any I/O. Reaches into trio's private `_ssl_object` (the
    stdlib SSLObject over memory BIOs); if that is gone in a later trio, it hands on `first`
    alone."""
    ssl_object = getattr(stream, "_ssl_object", None)
    if ssl_object is None:
        return bytes(first)
    chunks, total = [first], len(first)
    while total < limit:
        try:
            # Asking for more than a record would allocate that much for each record read.
            more = ssl_object.read(min(limit - total, TLS_RECORD_BYTES))
        except ssl.SSLError:  # SSLWantReadError: nothing buffered; others: next read raises
            break
        if not more:
            break
        chunks.append(more)
        total += len(more)
    return b"".join(chunks)


class LargeReadStream(trio.abc.HalfCloseableStream):
    """A socket stream whose default read takes up to `read_size.bytes`, so that SSLStream
    refills its buffer with many TLS records per system call (trio's SocketStream cannot be
    subclassed, so this wraps it)."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.socket = inner.socket  # Hypercorn reads the peer address from it
        self.read_size = ReadSize()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = self.read_size.bytes if max_bytes is None else max_bytes
        return await self.inner.receive_some(size)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class LargeReadListener(trio.abc.Listener[LargeReadStream]):
    def __init__(self, inner: trio.SocketListener) -> None:
        self.inner = inner

    async def accept(self) -> LargeReadStream:
        return LargeReadStream(await self.inner.accept())

    async def aclose(self) -> None:
        await self.inner.aclose()


def hypercorn_config(host: str, port: int, shutdown_timeout: float) -> HypercornConfig:
    """Hypercorn's config built from values we checked ourselves (its TOML loader accepts
    unknown keys silently, so we never use it)."""
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = shutdown_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.h11_max_incomplete_size = 64 * 1024
    # Body messages waiting for the app, per request: with drained reads each is up to
    # SOCKET_READ_SIZE, so this bounds what a request held at the bulk gate keeps in memory.
    config.max_app_queue_size = 1
    return config


async def serve(
    app: Any,
    config: HypercornConfig,
    trust: TrustStore,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` over TLS until shutdown_trigger returns; reports the bound addresses."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            listeners = []
            bound: list[tuple[str, int]] = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(
                    trio.SSLListener(
                        LargeReadListener(
                            trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                        ),
                        trust.context,
                        https_compatible=True,
                    )
                )
                bound.append(sock.getsockname()[:2])
            task_status.started(bound)
            handler = partial(
                PeerCertTCPServer, wrapped, config, context, ConnectionState(lifespan_state)
            )
            async with trio.open_nursery() as nursery:
                serve_listeners = partial(
                    trio.serve_listeners, handler, listeners, handler_nursery=server_nursery
                )
                nursery.start_soon(serve_listeners)
                await shutdown_trigger()
                nursery.cancel_scope.cancel()
            await context.terminated.set()
            server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
