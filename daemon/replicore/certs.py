"""TLS material: self-signed v3 certificates for the server and for sources, fingerprints.

Certificates are proper v3 (basic constraints, key usage, extended key usage, key
identifiers) so that they pass Python 3.13's VERIFY_X509_STRICT both as a server
certificate and as a client certificate added to a trust store.

`cryptography` is imported by the functions that parse or make certificates, not with this
module: a source's `push` needs only fingerprints and file paths, and importing
cryptography.x509 costs it some 25 ms of start-up.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

VALIDITY = datetime.timedelta(days=3650)


class CertificateError(ValueError):
    """A PEM text that is not one usable X.509 certificate."""


def fingerprint_der(der: bytes) -> str:
    """SHA-256 fingerprint of a DER certificate, lower-case hex without separators."""
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept 'AB:CD:..', 'abcd..' or 'SHA256:..' spellings; return lower-case hex."""
    cleaned = text.strip().lower().removeprefix("sha256:").replace(":", "").replace(" ", "")
    if len(cleaned) != 64 or any(c not in "0123456789abcdef" for c in cleaned):
        raise ValueError("a SHA-256 fingerprint is 64 hex digits")
    return cleaned


def load_pem_certificate(pem: str) -> x509.Certificate:
    """Parse exactly one PEM certificate, with a clear error otherwise."""
    from cryptography import x509

    if not isinstance(pem, str) or "-----BEGIN CERTIFICATE-----" not in pem:
        raise CertificateError("not a PEM certificate")
    if pem.count("-----BEGIN CERTIFICATE-----") != 1:
        raise CertificateError("must hold exactly one certificate")
    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as error:
        raise CertificateError(f"cannot parse certificate: {error}") from None


def pem_fingerprint(pem: str) -> str:
    from cryptography.hazmat.primitives import serialization

    cert = load_pem_certificate(pem)
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def check_client_certificate(pem: str) -> x509.Certificate:
    """A source certificate we accept into the trust store: self-signed, valid now, clientAuth."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert = load_pem_certificate(pem)
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError("certificate is not valid now")
    if cert.issuer != cert.subject:
        raise CertificateError("certificate must be self-signed")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, Exception) as error:  # InvalidSignature has no common base
        raise CertificateError(f"certificate signature does not verify: {error}") from None
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateError("certificate lacks extended key usage clientAuth") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertificateError("certificate lacks extended key usage clientAuth")
    return cert


def make_self_signed(
    common_name: str, *, server: bool, hostnames: list[str] | None = None
) -> tuple[bytes, bytes]:
    """A fresh P-256 key and a self-signed v3 certificate; returns (cert PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
    )
    if server:
        names: list[x509.GeneralName] = [x509.DNSName("localhost")]
        for host in hostnames or []:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def write_pair(cert_path: Path, key_path: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Write a certificate and its key (mode 0600) atomically."""
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    for path, data, mode in ((key_path, key_pem, 0o600), (cert_path, cert_pem, 0o644)):
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)


def ensure_server_certificate(tls_dir: Path) -> tuple[Path, Path]:
    """The server's self-signed certificate in tls_dir, made on first use."""
    cert_path, key_path = tls_dir / "server.crt", tls_dir / "server.key"
    if not (cert_path.exists() and key_path.exists()):
        host = socket.gethostname()
        cert_pem, key_pem = make_self_signed(f"replicore {host}", server=True, hostnames=[host])
        write_pair(cert_path, key_path, cert_pem, key_pem)
    return cert_path, key_path


def file_fingerprint(cert_path: Path) -> str:
    return pem_fingerprint(cert_path.read_text(encoding="ascii"))
