"""The push client's HTTP transport: pinned TLS connections that count every byte on the wire.

`TargetClient` sends requests to a paired target over a pool of keep-alive HTTP/1.1
connections (httpcore, thread-safe, one connection per concurrent caller).  TLS is done here,
not by `ssl.SSLSocket`: `_TLSStream` runs an `ssl.SSLObject` over memory BIOs on a plain TCP
socket, so every byte that passes through the socket is counted (`WireCounter`: the TLS
records, handshake included, both directions; TCP/IP headers are not counted), and sends can
be paced by a `TokenBucket` on those same bytes.  OpenSSL releases the GIL while it encrypts,
so connections driven from several threads encrypt in parallel.

The SSL context is `connection.ssl_context`: the target's pinned certificate is the only
trusted one, and the source presents its client certificate.
"""

from __future__ import annotations

import json
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpcore

from .connection import base_url, host_port, ssl_context
from .identity import Identity
from .ratelimit import TokenBucket

#: Plaintext written to OpenSSL at once (it turns it into 16 KiB TLS records).
WRITE_PIECE = 1024 * 1024
#: Bytes asked from the socket at once.
RECV_SIZE = 256 * 1024

CONNECT_TIMEOUT = 15.0
READ_TIMEOUT = 300.0
#: Attempts of one request when the connection fails (the data-path requests are idempotent).
ATTEMPTS = 4
#: Statuses that mean "try again later".
RETRY_STATUSES = (429, 503)


class TransportError(RuntimeError):
    """The target could not be reached, or the connection failed, after the retries."""


class PinMismatch(TransportError):
    """The target presented a certificate other than the pinned one."""


class WireCounter:
    """Bytes that went through the client's TCP sockets, summed over all connections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.received = 0
        self.connections = 0

    def add(self, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.sent += sent
            self.received += received

    def opened(self) -> None:
        with self._lock:
            self.connections += 1

    @property
    def total(self) -> int:
        return self.sent + self.received


def _readable(sock: socket.socket) -> bool:
    try:
        ready, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(ready)


class _PlainStream(httpcore.NetworkStream):
    """A TCP connection before TLS; only start_tls is used on it."""

    def __init__(self, sock: socket.socket, backend: CountingBackend) -> None:
        self._sock = sock
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        raise httpcore.ReadError("plain-text HTTP is not used")

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        raise httpcore.WriteError("plain-text HTTP is not used")

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        stream = _TLSStream(self._sock, ssl_context, server_hostname, self._backend)
        try:
            stream.handshake(timeout)
        except BaseException:
            stream.close()
            raise
        return stream

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._sock
        return None


class _TLSStream(httpcore.NetworkStream):
    """TLS over a plain socket through memory BIOs, counting and pacing the socket bytes."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        server_hostname: str | None,
        backend: CountingBackend,
    ) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        self._counter = backend.counter
        self._bucket = backend.bucket

    # -- socket level ------------------------------------------------------------------

    def _flush(self) -> None:
        while self._outgoing.pending:
            data = self._outgoing.read()
            if self._bucket is not None:
                self._bucket.acquire(len(data))
            self._sock.sendall(data)
            self._counter.add(sent=len(data))

    def _fill(self) -> None:
        data = self._sock.recv(RECV_SIZE)
        if data:
            self._counter.add(received=len(data))
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    # -- httpcore interface ------------------------------------------------------------

    def handshake(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                    self._flush()
                    return
                except ssl.SSLWantReadError:
                    self._flush()
                    self._fill()
        except ssl.SSLCertVerificationError as exc:
            raise httpcore.ConnectError(f"certificate check failed: {exc.verify_message}") from exc
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout("TLS handshake timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpcore.ConnectError(f"TLS handshake failed: {exc}") from exc

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._sock.settimeout(timeout)
        try:
            while True:
                try:
                    data = self._ssl.read(max_bytes)
                    self._flush()
                    return data
                except ssl.SSLWantReadError:
                    self._flush()
                    self._fill()
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b""
        except TimeoutError as exc:
            raise httpcore.ReadTimeout("timed out waiting for the target") from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._sock.settimeout(timeout)
        piece = WRITE_PIECE if self._bucket is None else self._bucket.piece_size
        view = memoryview(buffer)
        try:
            for start in range(0, len(view), piece):
                self._ssl.write(view[start : start + piece])
                self._flush()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout("timed out sending to the target") from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("TLS in TLS is not supported")

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._ssl
        if info == "socket":
            return self._sock
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "is_readable":
            return self._incoming.pending > 0 or _readable(self._sock)
        return None


class CountingBackend(httpcore.NetworkBackend):
    """httpcore network backend whose TLS streams count (and optionally pace) socket bytes."""

    def __init__(self, counter: WireCounter, bucket: TokenBucket | None = None) -> None:
        self.counter = counter
        self.bucket = bucket

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        source = None if local_address is None else (local_address, 0)
        try:
            sock = socket.create_connection((host, port), timeout, source_address=source)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for option in socket_options or ():
            sock.setsockopt(*option)
        self.counter.opened()
        return _PlainStream(sock, self)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not used")


@dataclass
class Answer:
    """A target's answer: status, headers (lower-case names), body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def error_message(self) -> str:
        """The `message` of a JSON error body, or a short rendering of whatever came back."""
        data = self.json()
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
        text = self.body[:200].decode("utf-8", "replace").strip()
        return text or f"HTTP {self.status}"


_NETWORK_ERRORS = (httpcore.NetworkError, httpcore.TimeoutException, httpcore.RemoteProtocolError)


class TargetClient:
    """Requests to one paired target; safe to use from several threads at once."""

    def __init__(
        self,
        url: str,
        target_pem: str,
        source: Identity | None,
        *,
        connections: int = 5,
        counter: WireCounter | None = None,
        bucket: TokenBucket | None = None,
        read_timeout: float = READ_TIMEOUT,
        attempts: int = ATTEMPTS,
    ) -> None:
        host_port(url)  # validates the URL
        self.url = url
        self.counter = counter or WireCounter()
        self._base = base_url(url).encode()
        self._attempts = attempts
        self._answered = False
        self._timeouts = {
            "connect": CONNECT_TIMEOUT,
            "read": read_timeout,
            "write": read_timeout,
            "pool": None,
        }
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context(target_pem, source),
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=30.0,
            http1=True,
            http2=False,
            network_backend=CountingBackend(self.counter, bucket),
        )

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> TargetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> Answer:
        """Send one request (path relative to .../replicationcomms/) and read the whole answer.

        Connection failures and 429/503 answers are retried (the data-path requests are
        idempotent); after the last attempt a TransportError is raised.  Other statuses are
        returned as they are.
        """
        head = [(b"Host", b""), (b"Accept", b"application/json")]
        if json_body is not None:
            content = json.dumps(json_body, separators=(",", ":")).encode()
            head.append((b"Content-Type", b"application/json"))
        elif content is not None:
            head.append((b"Content-Type", b"application/octet-stream"))
        if content is not None:
            head.append((b"Content-Length", str(len(content)).encode()))
        head.extend((k.encode(), v.encode()) for k, v in (headers or {}).items())
        url = httpcore.URL(self._base + b"/" + path.lstrip("/").encode())
        head[0] = (b"Host", url.host + (b":%d" % url.port if url.port else b""))
        attempts = self._attempts if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                response = self._pool.request(
                    method.encode(),
                    url,
                    headers=head,
                    content=content,
                    extensions={"timeout": self._timeouts},
                )
            except _NETWORK_ERRORS as exc:
                _refuse_tls_failures(self.url, exc)
                never_answered = not self._answered and isinstance(
                    exc, httpcore.RemoteProtocolError
                )
                if never_answered and attempt >= 2:
                    # The target drops a TLS client it does not know right after the
                    # handshake, without a word.
                    raise TransportError(
                        f"the target at {self.url} closed the connection without answering: "
                        "it does not accept this source's certificate (pair with "
                        "`replicore source pair` first)"
                    ) from exc
                if attempt == attempts:
                    raise TransportError(f"{self.url}: {exc or type(exc).__name__}") from exc
                time.sleep(_backoff(attempt))
                continue
            self._answered = True
            answer = Answer(
                response.status,
                {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers},
                response.content,
            )
            if answer.status in RETRY_STATUSES and attempt < attempts:
                time.sleep(_retry_after(answer, attempt))
                continue
            return answer
        raise AssertionError("unreachable")


def _ssl_cause(exc: BaseException) -> BaseException | None:
    """The ssl error behind a transport error (httpcore re-raises with `from None`, so the
    chain is followed through __context__ as well)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _refuse_tls_failures(url: str, exc: Exception) -> None:
    """Raise at once, without retrying, when TLS itself says no: a retry cannot help."""
    cause = _ssl_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        raise PinMismatch(
            f"the target at {url} presented a certificate other than the pinned one; "
            "refusing to talk to it (pair again if its certificate was replaced)"
        ) from exc
    if isinstance(cause, ssl.SSLError) and "ALERT" in str(cause.reason or "").upper():
        raise TransportError(
            f"the target at {url} refused this source's certificate ({cause.reason}); "
            "is this source paired with it?"
        ) from exc


def _backoff(attempt: int) -> float:
    return min(8.0, 0.25 * 3 ** (attempt - 1)) * (0.75 + random.random() / 2)


def _retry_after(answer: Answer, attempt: int) -> float:
    try:
        return min(30.0, max(0.0, float(answer.headers.get("retry-after", ""))))
    except ValueError:
        return _backoff(attempt)
