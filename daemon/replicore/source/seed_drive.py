"""Seed drives on the source side: writing one, remembering the drives made, abandoning one.

`create` reads each volume image once (reader.Image), keys its blocks (BLAKE3), stores each
distinct record once, compressed as the push sends it, with the image's full block map, then
signs the manifest with the source's key (format: `replicore.seed_drive`). The file is
written as DRIVE.tmp, flushed to disk and renamed, so a DRIVE that exists is whole.

When the drive is made for a paired target (`--target`, or the only one), its epochs are the
next ones of the push state for that target (`state.AgentState`), and once written they are
recorded there as committed: the next `replicore push` builds on them (previousEpochNumber =
the drive's epoch) and, through key negotiation, sends only what the target lacks. A push made
before the drive is consumed is kept on the target as orphaned until consumption repairs it.

Every drive made is remembered in `<identity dir>/seed-drives/<drive id>.json`; `drives`
lists them with their state as the target reports it (`consumedSeedDrives/{agentId}`), and
`abandon` gives one up (its epochs stop being the base of the next push).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import apsw
import blake3

from .. import protocol
from .. import seed_drive as fmt
from . import identity
from .identity import Identity, IdentityError
from .reader import Image, ImageError, hash_blocks
from .state import AgentState, StateError
from .transport import TargetClient, TransportError

#: Image bytes read and keyed at once.
READ_CHUNK = 8 * 1024 * 1024
#: zstd level of the drive's records (the push's level: level 3 costs a quarter more CPU for
#: about 1% fewer bytes, measured in STACK-NOTES).
COMPRESSION_LEVEL = 1


class SeedDriveError(RuntimeError):
    """A seed drive cannot be made, listed or abandoned; the message is one line."""


@dataclass(frozen=True)
class DriveVolume:
    volume_id: str
    path: str


@dataclass
class CreateOptions:
    agent_id: str
    volumes: list[DriveVolume]
    output: Path
    target_url: str | None = None
    directory: Path | None = None
    block_size: int = protocol.DEFAULT_BLOCK_SIZE


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def registry_dir(source: Identity) -> Path:
    return source.directory / "seed-drives"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as out:
        json.dump(data, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _target(source: Identity, url: str | None) -> dict[str, Any] | None:
    """The paired target the drive is for: the one named, else the only one, else None."""
    if url is not None:
        return source.find_target(url)
    targets = source.targets()
    if len(targets) > 1:
        raise SeedDriveError("paired with several targets; name the drive's with --target URL")
    return targets[0] if targets else None


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


class _Writer:
    """The drive being written (DRIVE.tmp), one volume image after another."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.conn = apsw.Connection(str(path))
        # A half-written .tmp is thrown away, never read: no journal needed while building.
        self.conn.execute("PRAGMA journal_mode=OFF")
        self.conn.execute("PRAGMA synchronous=OFF")
        self.conn.execute(f"PRAGMA application_id={fmt.APPLICATION_ID}")
        self.conn.execute(f"PRAGMA user_version={fmt.FORMAT_VERSION}")
        self.conn.execute("BEGIN")
        self.conn.execute(fmt.SCHEMA)
        self.bytes_read = 0
        self.records_added = 0

    def add_image(self, agent_id: str, volume_id: str, epoch: int, image: Image) -> str:
        """Store the image's records and block map; returns the block map digest."""
        self.conn.execute(
            "INSERT INTO images(agent_id, driver_volume_id, epoch_number) VALUES (?, ?, ?)",
            (agent_id, volume_id, epoch),
        )
        image_id = self.conn.last_insert_rowid()
        digest = blake3.blake3()
        bs = image.block_size
        chunk_blocks = max(1, READ_CHUNK // bs)
        buffer = memoryview(bytearray(chunk_blocks * bs))
        image.advise_sequential()
        for first in range(0, image.block_count, chunk_blocks):
            start = first * bs
            nbytes = min(chunk_blocks * bs, image.size - start)
            view = buffer[:nbytes]
            image.read_into(view, start)
            keys = hash_blocks(view, bs)
            marks = ",".join("?" * len(keys))
            present = {
                bytes(k)
                for (k,) in self.conn.execute(
                    f"SELECT key FROM records WHERE key IN ({marks})", keys
                )
            }
            for n, key in enumerate(keys):
                digest.update(key)
                if key in present:
                    continue
                present.add(key)
                block = view[n * bs : n * bs + bs]
                codec, payload = protocol.compress_block(block, COMPRESSION_LEVEL)
                self.conn.execute(
                    "INSERT INTO records(key, raw_length, codec, data) VALUES (?, ?, ?, ?)",
                    (key, len(block), codec, payload),
                )
                self.records_added += 1
            self.conn.executemany(
                "INSERT INTO image_blocks(image_id, block_index, key) VALUES (?, ?, ?)",
                [(image_id, first + n, key) for n, key in enumerate(keys)],
            )
            self.bytes_read += nbytes
        return digest.hexdigest()

    def records_digest(self) -> fmt.RecordsDigest:
        digest = fmt.RecordsDigest()
        after = b""
        while True:
            batch = list(
                self.conn.execute(
                    "SELECT key, raw_length, codec, data FROM records WHERE key > ?"
                    " ORDER BY key LIMIT ?",
                    (after, fmt.RECORD_BATCH),
                )
            )
            if not batch:
                return digest
            for key, raw_length, codec, data in batch:
                digest.update(key, raw_length, codec, data)
            after = batch[-1][0]

    def finish(self, manifest_bytes: bytes, signature: bytes, certificate_pem: str) -> None:
        self.conn.executemany(
            "INSERT INTO drive(name, value) VALUES (?, ?)",
            [
                ("manifest", manifest_bytes),
                ("signature", signature),
                ("certificate", certificate_pem.encode("ascii")),
            ],
        )
        self.conn.execute("COMMIT")
        self.conn.close()
        with open(self.path, "rb") as written:
            os.fsync(written.fileno())

    def abort(self) -> None:
        with contextlib.suppress(apsw.Error):
            self.conn.close()
        self.path.unlink(missing_ok=True)


def _check_options(options: CreateOptions) -> None:
    if not options.volumes:
        raise SeedDriveError("name at least one --volume DRIVER_VOLUME_ID=PATH")
    ids = [v.volume_id for v in options.volumes]
    if len(set(ids)) != len(ids):
        raise SeedDriveError("a driver volume id is named twice")
    try:
        protocol.check_block_size(options.block_size)
    except protocol.ProtocolError as error:
        raise SeedDriveError(f"--block-size: {error}") from None
    if options.output.exists():
        raise SeedDriveError(f"{options.output} exists; a seed drive is never overwritten")
    if not options.output.parent.is_dir():
        raise SeedDriveError(f"{options.output.parent} is not a directory")


def _epochs(
    state: AgentState | None, volumes: list[DriveVolume]
) -> dict[str, tuple[int, int | None]]:
    """volume id -> (epoch, previous epoch) of the drive's images."""
    found: dict[str, tuple[int, int | None]] = {}
    for volume in volumes:
        previous = None if state is None else state.committed_epoch(volume.volume_id)
        found[volume.volume_id] = (1 if previous is None else previous + 1, previous)
    return found


def create(options: CreateOptions) -> dict[str, Any]:
    """Write the seed drive; returns what it holds (the registry entry plus figures)."""
    _check_options(options)
    try:
        source = identity.load(options.directory)
        target = _target(source, options.target_url)
    except IdentityError as error:
        raise SeedDriveError(str(error)) from None
    target_core = str(target.get("coreId") or "") if target else ""
    try:
        with contextlib.ExitStack() as stack:
            state = None
            if target is not None:
                state = stack.enter_context(
                    AgentState.locked(source, target_core, options.agent_id)
                )
                if state.run is not None:
                    raise SeedDriveError(
                        f"a push of agent {options.agent_id} to {target['url']} was interrupted;"
                        " finish it with `replicore push` before making a seed drive"
                    )
            return _create(options, source, target, state)
    except (StateError, ImageError) as error:
        raise SeedDriveError(str(error)) from None


def _create(
    options: CreateOptions,
    source: Identity,
    target: dict[str, Any] | None,
    state: AgentState | None,
) -> dict[str, Any]:
    private_key = fmt.load_private_key(source.key_path)
    epochs = _epochs(state, options.volumes)
    drive_id = str(uuid.uuid4())
    created_at = _utc_now()
    recovery_point_id = str(uuid.uuid4())
    tmp = options.output.with_name(options.output.name + ".tmp")
    writer = _Writer(tmp)
    entries: list[fmt.ManifestImage] = []
    try:
        for volume in options.volumes:
            epoch, previous = epochs[volume.volume_id]
            with Image(volume.path, options.block_size) as image:
                if image.size == 0:
                    raise SeedDriveError(f"{volume.path} is empty")
                digest = writer.add_image(options.agent_id, volume.volume_id, epoch, image)
                entries.append(
                    fmt.ManifestImage(
                        agent_id=options.agent_id,
                        driver_volume_id=volume.volume_id,
                        epoch_number=epoch,
                        previous_epoch_number=previous,
                        block_size=image.block_size,
                        size=image.size,
                        block_count=image.block_count,
                        recovery_point_id=recovery_point_id,
                        recovery_point_timestamp=created_at,
                        volume_count=len(options.volumes),
                        block_map_digest=digest,
                    )
                )
        records = writer.records_digest()
        manifest = fmt.Manifest(
            format=fmt.FORMAT_NAME,
            version=fmt.FORMAT_VERSION,
            drive_id=drive_id,
            created_at=created_at,
            source=fmt.ManifestSource(
                core_id=source.core_id,
                host_name=source.host_name,
                certificate_fingerprint=source.fingerprint,
            ),
            target_core_id=(str(target.get("coreId")) if target else None),
            agents=[options.agent_id],
            images=entries,
            record_count=records.count,
            records_raw_bytes=records.raw_bytes,
            records_stored_bytes=records.stored_bytes,
            records_digest=records.hexdigest(),
            key_algorithm="blake3-256",
            signature_algorithm=fmt.signature_algorithm(private_key),
        )
        manifest_bytes = fmt.encode_manifest(manifest)
        signature = fmt.sign(private_key, manifest_bytes)
        writer.finish(manifest_bytes, signature, source.certificate_pem)
        os.replace(tmp, options.output)
        _fsync_dir(options.output.parent)
    except BaseException:
        writer.abort()
        raise
    entry = {
        "driveId": drive_id,
        "file": str(options.output.resolve()),
        "createdAt": created_at,
        "agentId": options.agent_id,
        "targetUrl": target["url"] if target else None,
        "targetCoreId": manifest.target_core_id,
        "volumes": [
            {
                "driverVolumeId": image.driver_volume_id,
                "epochNumber": image.epoch_number,
                "previousEpochNumber": image.previous_epoch_number,
            }
            for image in entries
        ],
        "state": "outstanding",
        "consumedAt": None,
    }
    _write_json(registry_dir(source) / f"{drive_id}.json", entry)
    if state is not None:
        for image in entries:
            state.data["volumes"][image.driver_volume_id] = {
                "committedEpoch": image.epoch_number,
                "seedDrive": drive_id,
            }
        state.save()
    return {
        **entry,
        "recordCount": manifest.record_count,
        "recordsRawBytes": manifest.records_raw_bytes,
        "recordsStoredBytes": manifest.records_stored_bytes,
        "bytesRead": writer.bytes_read,
        "fileBytes": options.output.stat().st_size,
    }


# --------------------------------------------------------------------------
# The drives made, as the target sees them
# --------------------------------------------------------------------------


def _registry(source: Identity) -> list[dict[str, Any]]:
    folder = registry_dir(source)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        with contextlib.suppress(ValueError, OSError):
            found.append(json.loads(path.read_text()))
    return sorted(found, key=lambda e: e.get("createdAt") or "")


def _consumed_on(
    source: Identity, target: dict[str, Any], agent_id: str
) -> dict[str, dict[str, Any]]:
    """driveId -> the target's record of it, for the drives it consumed for `agent_id`."""
    pem = target.get("certificate")
    if not isinstance(pem, str):
        raise SeedDriveError(f"the pairing record of {target.get('url')} has no certificate")
    with TargetClient(target["url"], pem, source, connections=1, attempts=1) as client:
        answer = client.request("GET", f"consumedSeedDrives/{quote(agent_id, safe='')}")
    if answer.status != 200:
        raise SeedDriveError(
            f"{target['url']}: consumedSeedDrives/{agent_id}: HTTP {answer.status}:"
            f" {answer.error_message()}"
        )
    data = answer.json()
    drives = data.get("seedDrives") if isinstance(data, dict) else None
    if not isinstance(drives, list):
        raise SeedDriveError(f"{target['url']}: malformed answer to consumedSeedDrives")
    return {d["driveId"]: d for d in drives if isinstance(d, dict) and "driveId" in d}


def drives(directory: Path | None = None, target_url: str | None = None) -> list[dict[str, Any]]:
    """The drives this source made (of `target_url` only, when given), each with its `state`
    (outstanding, consumed, abandoned) refreshed from the targets that can be reached;
    `checked` is False for a drive whose target could not be asked."""
    try:
        source = identity.load(directory)
    except IdentityError as error:
        raise SeedDriveError(str(error)) from None
    entries = _registry(source)
    if target_url is not None:
        wanted = target_url.rstrip("/")
        entries = [e for e in entries if (e.get("targetUrl") or "").rstrip("/") == wanted]
    answers: dict[tuple[str, str], dict[str, dict[str, Any]] | None] = {}
    for entry in entries:
        entry["checked"] = False
        url, agent = entry.get("targetUrl"), entry.get("agentId")
        if not url or not agent or entry.get("state") == "consumed":
            entry["checked"] = entry.get("state") == "consumed"
            continue
        if (url, agent) not in answers:
            try:
                answers[(url, agent)] = _consumed_on(source, source.find_target(url), agent)
            except (SeedDriveError, IdentityError, TransportError):
                answers[(url, agent)] = None
        consumed = answers[(url, agent)]
        if consumed is None:
            continue
        entry["checked"] = True
        found = consumed.get(entry["driveId"])
        if found is not None and entry.get("state") != "consumed":
            entry["state"] = "consumed"
            entry["consumedAt"] = found.get("consumedAt")
            _write_json(registry_dir(source) / f"{entry['driveId']}.json", _stored(entry))
    return entries


def _stored(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "checked"}


def abandon(drive_id: str, directory: Path | None = None) -> dict[str, Any]:
    """Give up an outstanding drive: the push state of its target goes back to the epochs
    before it (for volumes nothing was pushed on since). Refused once the target consumed it.
    Returns the entry, with `warnings` for volumes pushed on top of it."""
    try:
        source = identity.load(directory)
    except IdentityError as error:
        raise SeedDriveError(str(error)) from None
    matches = [e for e in drives(directory) if e.get("driveId", "").startswith(drive_id)]
    if not drive_id or not matches:
        raise SeedDriveError(f"this source made no seed drive {drive_id!r}")
    if len(matches) > 1:
        raise SeedDriveError(f"{drive_id!r} names several drives; give more of the id")
    entry = matches[0]
    if entry["state"] == "consumed":
        raise SeedDriveError(
            f"seed drive {entry['driveId']} was consumed by the target"
            f" ({entry.get('consumedAt')}); it cannot be abandoned"
        )
    if entry["state"] == "abandoned":
        return {**entry, "warnings": [], "alreadyAbandoned": True}
    warnings: list[str] = []
    if entry.get("targetUrl") and not entry.get("checked"):
        raise SeedDriveError(
            f"cannot ask {entry['targetUrl']} whether it consumed seed drive"
            f" {entry['driveId']}; try again when it can be reached"
        )
    if entry.get("targetCoreId"):
        try:
            with AgentState.locked(source, entry["targetCoreId"], entry["agentId"]) as state:
                for volume in entry["volumes"]:
                    vid = volume["driverVolumeId"]
                    current = state.data["volumes"].get(vid) or {}
                    if current.get("committedEpoch") == volume["epochNumber"]:
                        previous = volume["previousEpochNumber"]
                        if previous is None:
                            state.data["volumes"].pop(vid, None)
                        else:
                            state.data["volumes"][vid] = {"committedEpoch": previous}
                    elif (current.get("committedEpoch") or 0) > volume["epochNumber"]:
                        warnings.append(
                            f"volume {vid}: epochs pushed after this drive build on its epoch"
                            f" {volume['epochNumber']} and stay orphaned on the target"
                        )
                state.save()
        except StateError as error:
            raise SeedDriveError(str(error)) from None
    entry["state"] = "abandoned"
    entry["abandonedAt"] = _utc_now()
    _write_json(registry_dir(source) / f"{entry['driveId']}.json", _stored(entry))
    return {**entry, "warnings": warnings, "alreadyAbandoned": False}
