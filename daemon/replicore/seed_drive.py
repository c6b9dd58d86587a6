"""The seed drive file format, shared by its writer (source side) and its importer (target side).

A seed drive is one SQLite database file (docs/protocol.md, "Seed drives", is the reference):

* `drive(name, value)`: `manifest` (canonical JSON, UTF-8), `signature` (the source's
  signature over exactly those manifest bytes) and `certificate` (the signer's PEM, for
  information only: the target trusts the certificate it holds for the paired source);
* `records(key, raw_length, codec, data)`: every record the drive's images use, once, stored
  as the data path stores them (codec 0 raw, 1 one zstd frame; key = BLAKE3-256 of the
  uncompressed bytes, `protocol.record_key`);
* `images(id, agent_id, driver_volume_id, epoch_number)` and `image_blocks(image_id,
  block_index, key)`: the full block map (every block index) of each image; the image's other
  fields (sizes, previous epoch, recovery point) are in the signed manifest.

The manifest binds everything: `recordsDigest` covers every record (in key order, bytes as
stored) and each image's `blockMapDigest` covers its keys in block order, so changing any
byte of the file is caught by a digest or by the signature. This module owns the schema, the
manifest's fields and canonical encoding, the digests, signing and verifying; it knows
nothing of the target's database or the source's push state.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import apsw
import blake3
import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from . import protocol
from .store.db import MAX_STORED_INT

FORMAT_NAME = "replicore-seed-drive"
FORMAT_VERSION = 1
#: SQLite `application_id` of a seed drive: ASCII "RSD1".
APPLICATION_ID = 0x52534431
#: Records read back per step when digesting or importing (bounded memory).
RECORD_BATCH = 512
#: Block map entries read at once.
BLOCK_STEP = 16384

SCHEMA = """
CREATE TABLE drive (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) STRICT;
CREATE TABLE records (
    id         INTEGER PRIMARY KEY,
    key        BLOB NOT NULL UNIQUE CHECK (length(key) = 32),
    raw_length INTEGER NOT NULL,
    codec      INTEGER NOT NULL,
    data       BLOB NOT NULL
) STRICT;
CREATE TABLE images (
    id               INTEGER PRIMARY KEY,
    agent_id         TEXT NOT NULL,
    driver_volume_id TEXT NOT NULL,
    epoch_number     INTEGER NOT NULL,
    UNIQUE (agent_id, driver_volume_id, epoch_number)
) STRICT;
CREATE TABLE image_blocks (
    image_id    INTEGER NOT NULL REFERENCES images(id),
    block_index INTEGER NOT NULL,
    key         BLOB NOT NULL,
    PRIMARY KEY (image_id, block_index)
) STRICT, WITHOUT ROWID;
"""

_RECORD_HEAD = struct.Struct(">32sIBI")  # key, raw length, codec, stored length


class DriveError(ValueError):
    """The file is not a usable seed drive (unreadable, modified, forged, unsigned)."""


# --------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------

_TOKEN = r"^[A-Za-z0-9._:{}-]{1,128}$"
_HEX64 = r"^[0-9a-f]{64}$"
_EPOCH = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class ManifestSource(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    core_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    host_name: str
    certificate_fingerprint: Annotated[str, msgspec.Meta(pattern=_HEX64)]


class ManifestImage(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    agent_id: Annotated[str, msgspec.Meta(pattern=_TOKEN)]
    driver_volume_id: Annotated[str, msgspec.Meta(pattern=_TOKEN)]
    epoch_number: _EPOCH
    previous_epoch_number: _EPOCH | None
    block_size: int
    size: Annotated[int, msgspec.Meta(gt=0, le=MAX_STORED_INT)]
    block_count: Annotated[int, msgspec.Meta(gt=0, le=MAX_STORED_INT)]
    recovery_point_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    recovery_point_timestamp: str
    volume_count: Annotated[int, msgspec.Meta(ge=1, le=MAX_STORED_INT)]
    block_map_digest: Annotated[str, msgspec.Meta(pattern=_HEX64)]

    @property
    def name(self) -> str:
        return f"{self.driver_volume_id}:{self.epoch_number}"


class Manifest(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    format: str
    version: int
    drive_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f-]{36}$")]
    created_at: str
    source: ManifestSource
    target_core_id: str | None
    agents: list[str]
    images: list[ManifestImage]
    record_count: Annotated[int, msgspec.Meta(ge=0, le=MAX_STORED_INT)]
    records_raw_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_STORED_INT)]
    records_stored_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_STORED_INT)]
    records_digest: Annotated[str, msgspec.Meta(pattern=_HEX64)]
    key_algorithm: str
    signature_algorithm: str


def encode_manifest(manifest: Manifest) -> bytes:
    """The canonical bytes that are signed: JSON, keys sorted, no spaces, ASCII only."""
    data = msgspec.to_builtins(manifest)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def decode_manifest(data: bytes) -> Manifest:
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise DriveError(f"the drive's manifest is malformed: {error}") from None
    if manifest.format != FORMAT_NAME or manifest.version != FORMAT_VERSION:
        raise DriveError(
            f"the drive is {manifest.format} version {manifest.version}; this replicore reads"
            f" {FORMAT_NAME} version {FORMAT_VERSION}"
        )
    if manifest.key_algorithm != "blake3-256":
        raise DriveError(f"unknown record key algorithm {manifest.key_algorithm!r}")
    names = [(i.agent_id, i.driver_volume_id, i.epoch_number) for i in manifest.images]
    if len(set(names)) != len(names):
        raise DriveError("the drive's manifest lists an image twice")
    if sorted(set(i.agent_id for i in manifest.images)) != sorted(manifest.agents):
        raise DriveError("the drive's manifest lists agents other than those of its images")
    for image in manifest.images:
        try:
            protocol.check_block_size(image.block_size)
        except protocol.ProtocolError as error:
            raise DriveError(f"image {image.name}: {error.message}") from None
        if image.block_count != -(-image.size // image.block_size):
            raise DriveError(f"image {image.name}: blockCount does not match size and blockSize")
        previous = image.previous_epoch_number
        if previous is not None and previous >= image.epoch_number:
            raise DriveError(f"image {image.name}: previousEpochNumber is not lower")
    return manifest


# --------------------------------------------------------------------------
# Digests
# --------------------------------------------------------------------------


class RecordsDigest:
    """BLAKE3-256 over the records in ascending key order, each as
    `key(32) || u32 raw_length || u8 codec || u32 stored_length || stored bytes`."""

    def __init__(self) -> None:
        self._hasher = blake3.blake3()
        self._last: bytes | None = None
        self.count = 0
        self.raw_bytes = 0
        self.stored_bytes = 0

    def update(self, key: bytes, raw_length: int, codec: int, data: bytes) -> None:
        if self._last is not None and key <= self._last:
            raise ValueError("records must be added in strictly ascending key order")
        self._last = key
        self._hasher.update(_RECORD_HEAD.pack(key, raw_length, codec, len(data)))
        self._hasher.update(data)
        self.count += 1
        self.raw_bytes += raw_length
        self.stored_bytes += len(data)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


# --------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------


def signature_algorithm(key: Any) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return "ecdsa-sha256"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "rsa-pkcs1v15-sha256"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    raise DriveError(f"keys of type {type(key).__name__} cannot sign a seed drive")


def load_private_key(path: Path) -> Any:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise DriveError(f"cannot load the source's key {path}: {error}") from None


def sign(private_key: Any, data: bytes) -> bytes:
    algorithm = signature_algorithm(private_key)
    if algorithm == "ecdsa-sha256":
        return bytes(private_key.sign(data, ec.ECDSA(hashes.SHA256())))
    if algorithm == "rsa-pkcs1v15-sha256":
        return bytes(private_key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
    return bytes(private_key.sign(data))


def verify(certificate_pem: str, algorithm: str, signature: bytes, data: bytes) -> None:
    """Raise DriveError unless `signature` over `data` verifies with the certificate's key."""
    try:
        public_key = x509.load_pem_x509_certificate(certificate_pem.encode()).public_key()
    except ValueError as error:
        raise DriveError(f"the paired source's certificate cannot be read: {error}") from None
    if signature_algorithm(public_key) != algorithm:
        raise DriveError(
            f"the drive says it is signed with {algorithm}, which is not the paired source's"
            " key type: forged or modified drive"
        )
    try:
        if algorithm == "ecdsa-sha256":
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr,call-arg]
        elif algorithm == "rsa-pkcs1v15-sha256":
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]
        else:
            public_key.verify(signature, data)  # type: ignore[union-attr,call-arg]
    except InvalidSignature:
        raise DriveError(
            "the drive's signature does not verify with the paired source's certificate:"
            " the drive was forged or modified"
        ) from None


# --------------------------------------------------------------------------
# Reading a drive
# --------------------------------------------------------------------------


class SeedDrive:
    """A seed drive open read-only, inside one read transaction (one consistent snapshot
    for as long as it is open)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise DriveError(f"{path} is not a file")
        try:
            self.conn = apsw.Connection(
                f"file:{path.resolve()}?mode=ro",
                flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI,
            )
            self.conn.execute("BEGIN")
            application_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
            values = dict(self.conn.execute("SELECT name, value FROM drive"))
        except apsw.Error as error:
            self.close()
            raise DriveError(f"{path} is not a seed drive ({error})") from None
        if application_id != APPLICATION_ID:
            self.close()
            raise DriveError(f"{path} is not a seed drive (application id {application_id:#x})")
        self.manifest_bytes = bytes(values.get("manifest") or b"")
        self.signature = bytes(values.get("signature") or b"")
        certificate = values.get("certificate") or b""
        self.certificate_pem = bytes(certificate).decode("ascii", "replace")
        if not self.manifest_bytes:
            self.close()
            raise DriveError(f"{path} has no manifest")
        self.manifest = decode_manifest(self.manifest_bytes)

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
            self.conn = None  # type: ignore[assignment]

    def __enter__(self) -> SeedDrive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- contents ----------------------------------------------------------------------

    def record_batches(self) -> Iterator[list[tuple[bytes, int, int, bytes]]]:
        """(key, raw_length, codec, data) of every record, ascending key order, in batches."""
        after = b""
        while True:
            batch = [
                (bytes(k), int(n), int(c), bytes(d))
                for k, n, c, d in self.conn.execute(
                    "SELECT key, raw_length, codec, data FROM records WHERE key > ?"
                    " ORDER BY key LIMIT ?",
                    (after, RECORD_BATCH),
                )
            ]
            if not batch:
                return
            yield batch
            after = batch[-1][0]

    def block_map(self, image: ManifestImage, step: int = BLOCK_STEP) -> Iterator[list[bytes]]:
        """The image's keys in block index order, `step` blocks at a time; DriveError unless
        every block 0..n-1 has exactly one."""
        found = self.conn.execute(
            "SELECT id FROM images WHERE agent_id = ? AND driver_volume_id = ?"
            " AND epoch_number = ?",
            (image.agent_id, image.driver_volume_id, image.epoch_number),
        ).fetchone()
        if found is None:
            raise DriveError(f"the drive has no block map for image {image.name}")
        count = 0
        for start in range(0, image.block_count, step):
            stop = min(image.block_count, start + step)
            keys: list[bytes] = []
            for index, key in self.conn.execute(
                "SELECT block_index, key FROM image_blocks WHERE image_id = ?"
                " AND block_index >= ? AND block_index < ? ORDER BY block_index",
                (found[0], start, stop),
            ):
                if index != start + len(keys) or len(key) != protocol.KEY_SIZE:
                    raise DriveError(f"the block map of image {image.name} is damaged")
                keys.append(bytes(key))
            if len(keys) != stop - start:
                raise DriveError(
                    f"the block map of image {image.name} lacks block {start + len(keys)}"
                )
            count += len(keys)
            yield keys
        total = self.conn.execute(
            "SELECT count(*) FROM image_blocks WHERE image_id = ?", (found[0],)
        ).fetchone()[0]
        if total != count:
            raise DriveError(
                f"the block map of image {image.name} has {total} blocks, the manifest says"
                f" {image.block_count}"
            )

    def record_sizes(self) -> Iterator[list[tuple[bytes, int]]]:
        """(key, stored length) of every record, ascending key order, in batches."""
        after = b""
        while True:
            batch = [
                (bytes(k), int(n))
                for k, n in self.conn.execute(
                    "SELECT key, length(data) FROM records WHERE key > ? ORDER BY key LIMIT 1000",
                    (after,),
                )
            ]
            if not batch:
                return
            yield batch
            after = batch[-1][0]

    def record_lengths(self, keys: list[bytes]) -> dict[bytes, int]:
        """Raw length of each of `keys` the drive carries (absent keys are left out)."""
        found: dict[bytes, int] = {}
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            marks = ",".join("?" * len(chunk))
            for key, raw_length in self.conn.execute(
                f"SELECT key, raw_length FROM records WHERE key IN ({marks})", chunk
            ):
                found[bytes(key)] = int(raw_length)
        return found


def verify_record(key: bytes, raw_length: int, codec: int, data: bytes) -> None:
    """DriveError unless the record decompresses to `raw_length` bytes whose key is `key`."""
    try:
        raw = protocol.decompress_record(codec, data, raw_length)
    except protocol.ProtocolError as error:
        raise DriveError(
            f"record {key.hex()} cannot be decompressed ({error.message}): damaged drive"
        ) from None
    if protocol.record_key(raw) != key:
        raise DriveError(f"record {key.hex()} does not match its key: damaged or forged drive")


def check_contents(drive: SeedDrive) -> None:
    """Verify every record (decompress + key) and the records digest, and every block map
    (complete, digest as signed, each key a record of the drive). Reads, writes nothing."""
    manifest = drive.manifest
    digest = RecordsDigest()
    damaged: DriveError | None = None
    for batch in drive.record_batches():
        for key, raw_length, codec, data in batch:
            digest.update(key, raw_length, codec, data)
            if damaged is None:
                try:
                    verify_record(key, raw_length, codec, data)
                except DriveError as error:
                    damaged = error
    if (
        digest.hexdigest() != manifest.records_digest
        or digest.count != manifest.record_count
        or digest.stored_bytes != manifest.records_stored_bytes
        or digest.raw_bytes != manifest.records_raw_bytes
    ):
        raise DriveError(
            "the drive's records differ from those its manifest signs for: modified drive"
        )
    if damaged is not None:
        raise damaged
    for image in manifest.images:
        hasher = blake3.blake3()
        last = image.block_count - 1
        index = 0
        for keys in drive.block_map(image):
            for key in keys:
                hasher.update(key)
            lengths = drive.record_lengths(list(dict.fromkeys(keys)))
            for key in keys:
                expected = (
                    image.block_size if index < last else image.size - last * image.block_size
                )
                length = lengths.get(key)
                if length is None:
                    raise DriveError(
                        f"block {index} of image {image.name} uses a record the drive does not"
                        " carry"
                    )
                if length != expected:
                    raise DriveError(
                        f"block {index} of image {image.name} is {expected} bytes long; its"
                        f" record has {length}"
                    )
                index += 1
        if hasher.hexdigest() != image.block_map_digest:
            raise DriveError(
                f"the block map of image {image.name} differs from the one its manifest signs"
                " for: modified drive"
            )
