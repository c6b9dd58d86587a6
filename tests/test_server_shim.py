"""The server shim: plaintext already decryptable is handed on in one piece, and the peer
certificate's fingerprint reaches the ASGI scope."""

from __future__ import annotations

import ssl

import trio
import trio.testing

from replicore import certs
from replicore.server import (
    READ_SIZE_KEY,
    SOCKET_READ_SIZE,
    ReadSize,
    _ScopeWithPeer,
    drain_decrypted,
    peer_tls_info,
)


def tls_pair(tmp_path) -> tuple[trio.SSLStream, trio.SSLStream]:
    cert_pem, key_pem = certs.make_self_signed("shim test", server=True)
    cert, key = tmp_path / "s.crt", tmp_path / "s.key"
    certs.write_pair(cert, key, cert_pem, key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(cert), str(key))
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.load_verify_locations(cadata=cert_pem.decode())
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_ctx, server_hostname="localhost")
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)
    return client, server


async def test_drain_hands_on_every_record_already_received(tmp_path):
    client, server = tls_pair(tmp_path)
    payload = bytes(range(256)) * 1024  # 256 KiB: sixteen 16 KiB TLS records
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, payload)
        first = await server.receive_some(16384)
        # Let the whole payload reach the server's incoming buffer, as one large read would.
        await trio.testing.wait_all_tasks_blocked()
        received = bytearray(first)
        largest = 0
        while len(received) < len(payload):
            chunk = drain_decrypted(server, await server.receive_some(16384), SOCKET_READ_SIZE)
            largest = max(largest, len(chunk))
            received += chunk
    assert bytes(received) == payload
    assert largest > 16384, "several TLS records should have been handed on at once"


async def test_drain_stops_at_its_limit_and_loses_nothing(tmp_path):
    client, server = tls_pair(tmp_path)
    payload = b"x" * (SOCKET_READ_SIZE * 2 + 12345)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, payload)
        while len(received) < len(payload):
            chunk = drain_decrypted(server, await server.receive_some(16384), SOCKET_READ_SIZE)
            assert len(chunk) <= SOCKET_READ_SIZE + 16384
            received += chunk
    assert bytes(received) == payload


async def test_drain_with_nothing_buffered_returns_the_first_chunk(tmp_path):
    client, server = tls_pair(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"hello")
        first = await server.receive_some()
    assert drain_decrypted(server, first, SOCKET_READ_SIZE) == b"hello"


async def test_peer_certificate_fingerprint_reaches_the_scope():
    cert_pem, _ = certs.make_self_signed("peer", server=False)
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
    seen = {}

    async def app(scope, receive, send, *args):
        seen.update(scope["extensions"]["tls"], read_size=scope["extensions"][READ_SIZE_KEY])

    read_size = ReadSize()
    await _ScopeWithPeer(app, peer_tls_info(der), read_size)({"type": "http"}, None, None)
    assert seen["read_size"] is read_size
    assert seen["client_cert_fingerprint"] == certs.fingerprint_der(der)
    assert seen["client_cert_chain"][0].startswith("-----BEGIN CERTIFICATE-----")
    assert peer_tls_info(None)["client_cert_fingerprint"] is None
