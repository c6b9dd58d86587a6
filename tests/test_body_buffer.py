"""`body_buffer.PassingReceiveBuffer`: h11 parses the same events from it as from its own
buffer, however the bytes are cut, and a body piece that arrives whole is handed on as the
very object received."""

from __future__ import annotations

import random
from typing import Any

import h11
import pytest

from replicore import body_buffer


def _stream(rng: random.Random) -> bytes:
    """Pipelined requests: fixed-length bodies, a chunked one, one without a body."""
    out = []
    for n in range(4):
        body = rng.randbytes(rng.randrange(0, 5000))
        out.append(
            b"POST /r%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (n, len(body), body)
        )
    out.append(
        b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    out.append(b"GET /last HTTP/1.1\r\nHost: t\r\n\r\n")
    return b"".join(out)


def _events(connection: h11.Connection, pieces: list[bytes]) -> list[Any]:
    """(kind, target or bytes) of everything parsed, answering each request so that the
    next one is read."""
    seen: list[Any] = []
    for piece in [*pieces, b""]:
        connection.receive_data(piece)
        while True:
            event = connection.next_event()
            if event in (h11.NEED_DATA, h11.PAUSED):
                break
            if isinstance(event, h11.Request):
                seen.append(("request", event.target))
            elif isinstance(event, h11.Data):
                seen.append(("data", bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                seen.append(("end", b""))
                connection.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                connection.send(h11.EndOfMessage())
                connection.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                seen.append(("closed", b""))
                return seen
    return seen


def _joined(events: list[Any]) -> list[Any]:
    """Consecutive data events joined (a cut may split a body differently)."""
    out: list[Any] = []
    for kind, value in events:
        if kind == "data" and out and out[-1][0] == "data":
            out[-1] = ("data", out[-1][1] + value)
        else:
            out.append((kind, value))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_the_same_events_as_h11s_own_buffer_however_the_bytes_are_cut(seed: int):
    rng = random.Random(seed)
    data = _stream(rng)
    cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(0, 40)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    plain = h11.Connection(h11.SERVER)
    passing = h11.Connection(h11.SERVER)
    assert body_buffer.install(passing)
    expected = _joined(_events(plain, pieces))
    assert _joined(_events(passing, pieces)) == expected
    assert [kind for kind, _ in expected].count("request") == 6


def test_a_body_piece_received_whole_is_handed_on_as_that_object():
    connection = h11.Connection(h11.SERVER)
    assert body_buffer.install(connection)
    body = random.Random(1).randbytes(1 << 20)
    connection.receive_data(
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (2 * len(body))
    )
    assert isinstance(connection.next_event(), h11.Request)
    assert connection.next_event() is h11.NEED_DATA
    connection.receive_data(body)
    event = connection.next_event()
    assert isinstance(event, h11.Data) and event.data is body
    # A piece that runs past the body is cut there; the rest waits for the next request.
    tail = body + b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    connection.receive_data(tail)
    event = connection.next_event()
    assert isinstance(event, h11.Data) and event.data == body
    assert isinstance(connection.next_event(), h11.EndOfMessage)
    connection.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
    connection.send(h11.EndOfMessage())
    connection.start_next_cycle()
    request = connection.next_event()
    assert isinstance(request, h11.Request) and request.target == b"/"


def test_only_a_fresh_h11_connection_gets_the_buffer():
    used = h11.Connection(h11.SERVER)
    used.receive_data(b"GET / HT")
    assert not body_buffer.install(used)
    assert not body_buffer.install(object())
    assert not body_buffer.install(None)
