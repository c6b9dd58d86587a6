"""A pinned TLS connection from a source to a target.

The target's certificate is self-signed: the source fetches it once (`fetch_certificate`),
compares its SHA-256 with the fingerprint the operator gave, and from then on trusts exactly
that certificate (it is the only CA of the client's SSL context; host names are not checked,
the pin is). Requests carry the source's client certificate unless `anonymous`.

httpx is imported by `client` and `async_client` only: `push` talks HTTP/1.1 through h11
(transport.py) and uses only the URL and TLS helpers from here, and importing httpx (with
rich, which httpx's command-line module pulls in) would cost it some 60 ms of start-up.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import certs
from .identity import Identity

if TYPE_CHECKING:
    import httpx

API_PATH = "/apprecovery/api/core/replicationcomms"
#: Seconds a control call waits for any one read, write or pooled connection; and to connect.
TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0


class PinError(RuntimeError):
    """The target's certificate is not the one pinned."""


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{url!r}: the target URL must be https://HOST:PORT")
    return parts.hostname, parts.port or 8006


def fetch_certificate(url: str, timeout: float = 10.0) -> str:
    """The PEM certificate the target presents (not verified: compare its fingerprint)."""
    host, port = host_port(url)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise PinError("the target presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der)


def pin(url: str, fingerprint: str) -> str:
    """Fetch the target's certificate and check it against the expected fingerprint."""
    expected = certs.normalize_fingerprint(fingerprint)
    pem = fetch_certificate(url)
    actual = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    if actual != expected:
        raise PinError(
            f"the target's certificate has SHA-256 {actual}, not the pinned {expected}; "
            "refusing to talk to it"
        )
    return pem


def ssl_context(target_pem: str, identity: Identity | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=target_pem)
    if identity is not None:
        context.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    return context


def base_url(url: str, prefix: str = API_PATH) -> str:
    return url.rstrip("/") + prefix


def client(url: str, target_pem: str, identity: Identity | None, **kwargs: Any) -> httpx.Client:
    """A blocking client for control calls; paths are relative to replicationcomms/."""
    import httpx

    return httpx.Client(
        base_url=base_url(url),
        verify=ssl_context(target_pem, identity),
        timeout=kwargs.pop("timeout", httpx.Timeout(TIMEOUT, connect=CONNECT_TIMEOUT)),
        **kwargs,
    )


def async_client(
    url: str, target_pem: str, identity: Identity | None, **kwargs: Any
) -> httpx.AsyncClient:
    import httpx

    return httpx.AsyncClient(
        base_url=base_url(url),
        verify=ssl_context(target_pem, identity),
        timeout=kwargs.pop("timeout", httpx.Timeout(TIMEOUT, connect=CONNECT_TIMEOUT)),
        **kwargs,
    )
