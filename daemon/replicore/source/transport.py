"""The push client's HTTP transport: pinned TLS connections that count every byte on the wire.

`TargetClient` sends requests to a paired target over a pool of keep-alive HTTP/1.1
connections (thread-safe, one connection per concurrent caller; h11 speaks the protocol).  TLS
is done here, not by `ssl.SSLSocket`: `_TLSStream` runs an `ssl.SSLObject` over memory BIOs on
a plain TCP socket, so every byte that passes through the socket is counted (`WireCounter`: the
TLS records, handshake included, both directions; TCP/IP headers are not counted), and sends
can be paced by a `TokenBucket` on those same bytes.  OpenSSL releases the GIL while it
encrypts, so connections driven from several threads encrypt in parallel.  A request body (one
bytes-like object, or a sequence of them sent one after the other) goes to OpenSSL as it is,
without a copy joining it to the request head.

The SSL context is `connection.ssl_context`: the target's pinned certificate is the only
trusted one, and the source presents its client certificate.

httpcore is not used: for a push, which sends blocking HTTP/1.1 requests, its pool was all it
added to h11, and importing it imports trio, anyio and h2 whenever they are installed (as they
are for the daemon), a third of the push command's start-up.
"""

from __future__ import annotations

import json
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import h11

from .connection import base_url, host_port, ssl_context
from .identity import Identity
from .ratelimit import TokenBucket

#: A request body: one bytes-like object, or pieces sent in order (no copy joins them).
Body: TypeAlias = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]

#: Plaintext written to OpenSSL at once (it turns it into 16 KiB TLS records).
WRITE_PIECE = 1024 * 1024
#: Buffers of a request smaller than this are gathered (copied) into one TLS write.
GATHER_BYTES = 16 * 1024
#: Bytes asked from the socket at once.
RECV_SIZE = 256 * 1024
#: Plaintext asked from OpenSSL at once (it hands out one TLS record's at most).
READ_SIZE = 64 * 1024
#: Largest answer head h11 buffers (the same bound httpcore used).
MAX_HEAD_BYTES = 100 * 1024

CONNECT_TIMEOUT = 15.0
READ_TIMEOUT = 300.0
#: Seconds an idle pooled connection is kept for reuse.
KEEPALIVE_SECONDS = 30.0
#: Attempts of one request when the connection fails (the data-path requests are idempotent).
ATTEMPTS = 4
#: Statuses that mean "try again later".
RETRY_STATUSES = (429, 503)


class TransportError(RuntimeError):
    """The target could not be reached, or the connection failed, after the retries."""


class PinMismatch(TransportError):
    """The target presented a certificate other than the pinned one."""


class _Failed(Exception):
    """One attempt failed on the network: connecting, TLS, reading, writing, a timeout."""


class _Disconnected(_Failed):
    """The target closed the connection before its whole answer, or broke HTTP/1.1."""


class _WriteFailed(_Failed):
    """Sending the request failed; the target may have answered before it stopped reading."""


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


class _TLSStream:
    """TLS over a plain socket through memory BIOs, counting and pacing the socket bytes."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        server_hostname: str | None,
        counter: WireCounter,
        bucket: TokenBucket | None,
    ) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        self._counter = counter
        self._bucket = bucket

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

    # -- stream interface --------------------------------------------------------------

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
            raise _Failed(f"certificate check failed: {exc.verify_message}") from exc
        except TimeoutError as exc:
            raise _Failed("TLS handshake timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise _Failed(f"TLS handshake failed: {exc}") from exc

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def read(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` of plaintext; b"" once the target closed the connection."""
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
            raise _Failed("timed out waiting for the target") from exc
        except (OSError, ssl.SSLError) as exc:
            raise _Failed(str(exc)) from exc

    def write(self, buffers: Iterable[bytes | bytearray | memoryview]) -> None:
        """Encrypt and send `buffers` in order, in pieces of at most WRITE_PIECE (or the rate
        limiter's piece).  OpenSSL reads each buffer in place; only buffers smaller than
        GATHER_BYTES (a request head, record frame headers) are gathered into one write
        first, so that each does not become a TLS record of its own."""
        piece = WRITE_PIECE if self._bucket is None else self._bucket.piece_size
        gathered = bytearray()
        try:
            for buffer in buffers:
                view = memoryview(buffer).cast("B")
                if len(view) < GATHER_BYTES:
                    gathered += view
                    if len(gathered) < GATHER_BYTES:
                        continue
                    view, gathered = memoryview(gathered), bytearray()
                elif gathered:
                    self._encrypt(memoryview(gathered), piece)
                    gathered = bytearray()
                self._encrypt(view, piece)
            if gathered:
                self._encrypt(memoryview(gathered), piece)
            self._flush()
        except TimeoutError as exc:
            raise _Failed("timed out sending to the target") from exc
        except (OSError, ssl.SSLError) as exc:
            raise _WriteFailed(str(exc)) from exc

    def _encrypt(self, view: memoryview, piece: int) -> None:
        for start in range(0, len(view), piece):
            self._ssl.write(view[start : start + piece])
            if self._bucket is not None or self._outgoing.pending >= piece:
                self._flush()

    def readable(self) -> bool:
        """Whether the target sent anything (on an idle connection: that it is closing)."""
        return self._incoming.pending > 0 or _readable(self._sock)

    def close(self) -> None:
        self._sock.close()


def _open_tls(
    host: str, port: int, context: ssl.SSLContext, counter: WireCounter, bucket: TokenBucket | None
) -> _TLSStream:
    """A TCP connection to the target and the TLS handshake on it, within CONNECT_TIMEOUT."""
    try:
        sock = socket.create_connection((host, port), CONNECT_TIMEOUT)
    except TimeoutError as exc:
        raise _Failed(f"connecting to {host}:{port} timed out") from exc
    except OSError as exc:
        raise _Failed(f"cannot connect to {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        counter.opened()
        stream = _TLSStream(sock, context, host, counter, bucket)
        stream.handshake(CONNECT_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return stream


class _Connection:
    """One keep-alive HTTP/1.1 connection: h11's state machine over a `_TLSStream`."""

    def __init__(self, stream: _TLSStream, timeout: float) -> None:
        self._stream = stream
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        stream.settimeout(timeout)  # the read and the write timeout are the same
        self.idle_since = time.monotonic()

    def reusable(self) -> bool:
        """Idle less than KEEPALIVE_SECONDS, and the target has not started to close it."""
        if time.monotonic() - self.idle_since > KEEPALIVE_SECONDS:
            return False
        return not self._stream.readable()

    def close(self) -> None:
        self._stream.close()

    def exchange(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: Sequence[memoryview],
    ) -> tuple[Answer, bool]:
        """Send one request and read its whole answer; returns it and whether this connection
        can carry another request."""
        conn = self._h11
        parts: list[Any] = [conn.send(h11.Request(method=method, target=target, headers=headers))]
        for piece in body:
            if piece:
                parts.extend(conn.send_with_data_passthrough(h11.Data(data=piece)) or ())
        parts.append(conn.send(h11.EndOfMessage()))
        sent = True
        try:
            self._stream.write(parts)
        except _WriteFailed:
            # A target may refuse a request before reading all of it, and answer: read that.
            sent = False
        del parts
        response = self._next_event()
        while not isinstance(response, h11.Response):  # 1xx answers precede the real one
            response = self._next_event()
        chunks: list[bytes | bytearray] = []
        while not isinstance(event := self._next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                chunks.append(event.data)
        answer = Answer(
            response.status_code,
            {k.decode("latin-1"): v.decode("latin-1") for k, v in response.headers},
            b"".join(chunks),
        )
        again = sent and conn.our_state is h11.DONE and conn.their_state is h11.DONE
        if again:
            conn.start_next_cycle()
            self.idle_since = time.monotonic()
        return answer, again

    def _next_event(self) -> Any:
        conn = self._h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Disconnected(str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event
            data = self._stream.read(READ_SIZE)
            if not data and conn.their_state is h11.SEND_RESPONSE:
                raise _Disconnected("Server disconnected without sending a response.")
            conn.receive_data(data)


class _Pool:
    """At most `size` connections to one target, each carrying one request at a time; a
    caller waits for one when all are busy."""

    def __init__(self, size: int, connect: Callable[[], _Connection]) -> None:
        self._size = max(1, size)
        self._connect = connect
        self._ready = threading.Condition()
        self._idle: list[_Connection] = []
        self._open = 0  # idle, busy, and being opened
        self._closed = False

    def acquire(self) -> _Connection:
        stale: list[_Connection] = []
        try:
            with self._ready:
                while True:
                    while self._idle:
                        conn = self._idle.pop()  # the most recently used
                        if conn.reusable():
                            return conn
                        self._open -= 1
                        stale.append(conn)
                    if self._open < self._size:
                        self._open += 1
                        break
                    self._ready.wait()
        finally:
            for conn in stale:
                conn.close()
        try:
            return self._connect()
        except BaseException:
            self._release_slot()
            raise

    def release(self, conn: _Connection, reusable: bool) -> None:
        with self._ready:
            if reusable and not self._closed:
                self._idle.append(conn)
                self._ready.notify()
                return
        conn.close()
        self._release_slot()

    def _release_slot(self) -> None:
        with self._ready:
            self._open -= 1
            self._ready.notify()

    def close(self) -> None:
        """Close the idle connections now, the busy ones when their request ends."""
        with self._ready:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._ready.notify_all()
        for conn in idle:
            conn.close()


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


def _pieces(content: Body) -> list[memoryview]:
    """The body as byte views of its pieces, without copying any."""
    if isinstance(content, (bytes, bytearray, memoryview)):
        content = [content]
    return [memoryview(piece).cast("B") for piece in content]


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
        self._address = host_port(url)  # validates the URL
        self.url = url
        self.counter = counter or WireCounter()
        self._target = urlsplit(base_url(url)).path.encode()
        self._host = urlsplit(url).netloc.rpartition("@")[2].encode()
        self._attempts = attempts
        self._answered = False
        self._context = ssl_context(target_pem, source)
        self._context.set_alpn_protocols(["http/1.1"])
        self._bucket = bucket
        self._timeout = read_timeout
        self._pool = _Pool(connections, self._connect)

    def _connect(self) -> _Connection:
        host, port = self._address
        stream = _open_tls(host, port, self._context, self.counter, self._bucket)
        return _Connection(stream, self._timeout)

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
        content: Body | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> Answer:
        """Send one request (path relative to .../replicationcomms/) and read the whole answer.

        `content` is sent as it is (bytes-like, or a sequence of pieces sent in order),
        without a copy.  Connection failures and 429/503 answers are retried (the data-path
        requests are idempotent); after the last attempt a TransportError is raised.  Other
        statuses are returned as they are.
        """
        head = [(b"Host", self._host), (b"Accept", b"application/json")]
        body: list[memoryview] = []
        if json_body is not None:
            body = _pieces(json.dumps(json_body, separators=(",", ":")).encode())
            head.append((b"Content-Type", b"application/json"))
        elif content is not None:
            body = _pieces(content)
            head.append((b"Content-Type", b"application/octet-stream"))
        if json_body is not None or content is not None:
            head.append((b"Content-Length", b"%d" % sum(len(piece) for piece in body)))
        head.extend((k.encode(), v.encode()) for k, v in (headers or {}).items())
        target = self._target + b"/" + path.lstrip("/").encode()
        attempts = self._attempts if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                answer = self._exchange(method.encode(), target, head, body)
            except _Failed as exc:
                _refuse_tls_failures(self.url, exc)
                if not self._answered and isinstance(exc, _Disconnected) and attempt >= 2:
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
            if answer.status in RETRY_STATUSES and attempt < attempts:
                time.sleep(_retry_after(answer, attempt))
                continue
            return answer
        raise AssertionError("unreachable")

    def _exchange(
        self,
        method: bytes,
        target: bytes,
        head: list[tuple[bytes, bytes]],
        body: Sequence[memoryview],
    ) -> Answer:
        conn = self._pool.acquire()
        again = False
        try:
            answer, again = conn.exchange(method, target, head, body)
        finally:
            self._pool.release(conn, again)
        return answer


def _ssl_cause(exc: BaseException) -> BaseException | None:
    """The ssl error behind a transport error (followed through __context__ as well)."""
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
