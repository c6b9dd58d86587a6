"""Seed drives on the target: consuming (importing) a drive, and the record of consumed drives.

`consume` runs in the operator's command against the daemon's database (the daemon may be
running). It refuses a drive unless its manifest's signature verifies with the certificate
this core holds for the source that signed it, and that source is approved; then it checks
every record (decompress + key) and every block map against the signed digests before writing
anything, so a forged, modified or unsigned drive changes nothing.

The import is crash-safe: records go in first, in batches of their own transactions (records
alone are invisible: content-addressed blocks no image uses, as a discarded session leaves
them); the images, their block maps and recovery points and the drive's `seed_drives` row
are written in one last transaction. A kill before it leaves no image and no consumed drive;
consuming again finds the records already there. Images are written exactly as a committed
session writes them (`store/images.py`): an image whose parent is on this core stores only the
blocks that differ from what the parent resolves to; an image whose parent is missing stays
orphaned (with all its blocks). Images on this core that were orphaned because an epoch of
the drive was missing become whole: their chain is repaired.

`seed_drives` / `seed_drive_images` record each consumed drive (drive id, source, when) and
the images it brought per agent; `consumed_for_agent` answers `consumedSeedDrives/{agentId}`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import apsw

from .. import protocol
from .. import seed_drive as fmt
from ..errors import Conflict, InsufficientStorage, NotFound
from . import agents, cores, images, inventory, meta, records, repositories, sessions
from .db import row, rows, transaction

SCHEMA = """
CREATE TABLE seed_drives (
    id             INTEGER PRIMARY KEY,
    drive_id       TEXT NOT NULL UNIQUE,
    core_pk        INTEGER NOT NULL REFERENCES master_cores(id) ON DELETE CASCADE,
    source_core_id TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    consumed_at    REAL NOT NULL,
    repository_id  INTEGER NOT NULL REFERENCES repositories(id),
    record_count   INTEGER NOT NULL,
    records_stored INTEGER NOT NULL,
    stored_bytes   INTEGER NOT NULL,
    manifest       TEXT NOT NULL
) STRICT;
CREATE TABLE seed_drive_images (
    drive_pk              INTEGER NOT NULL REFERENCES seed_drives(id) ON DELETE CASCADE,
    agent_pk              INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    driver_volume_id      TEXT NOT NULL,
    epoch_number          INTEGER NOT NULL,
    previous_epoch_number INTEGER,
    outcome               TEXT NOT NULL CHECK (outcome IN ('imported', 'already_present')),
    PRIMARY KEY (drive_pk, agent_pk, driver_volume_id, epoch_number)
) STRICT, WITHOUT ROWID;
CREATE INDEX seed_drive_images_agent ON seed_drive_images(agent_pk);
"""

#: Job id written on the images a seed drive brings (`volume_images.job_id`).
JOB_ID = "seed-drive"


@dataclass
class ConsumeResult:
    """What consuming a drive did (or, with `already_consumed`, did before)."""

    drive_id: str
    source_core_id: str
    already_consumed: bool
    consumed_at: float
    repository: str = ""
    record_count: int = 0
    records_stored: int = 0
    records_present: int = 0
    stored_bytes: int = 0
    images: list[dict[str, Any]] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    approved_agents: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """Where the drive's images go: the source, its agents, their one repository."""

    core: dict[str, Any]
    repository_id: int
    agent_pks: dict[str, int]
    to_approve: list[str]


def utc_timestamp(text: str) -> str:
    """An ISO 8601 time as the data path stores recovery point timestamps (UTC, `...Z`)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise fmt.DriveError(f"{text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------
# Checks before anything is written
# --------------------------------------------------------------------------


def signer(conn: apsw.Connection, drive: fmt.SeedDrive) -> dict[str, Any]:
    """The approved source whose certificate verifies the drive's signature (DriveError)."""
    manifest = drive.manifest
    if not drive.signature:
        raise fmt.DriveError("the drive is not signed; only signed drives are consumed")
    source = manifest.source
    core = cores.by_fingerprint(conn, source.certificate_fingerprint)
    if core is None or core["core_id"] != source.core_id:
        raise fmt.DriveError(
            f"the drive says it was made by source {source.core_id} (certificate"
            f" {source.certificate_fingerprint[:16]}...), which is not paired with this core"
        )
    if core["state"] != "approved":
        raise fmt.DriveError(
            f"source {source.core_id} is {core['state']} on this core; only the drives of"
            " approved sources are consumed"
        )
    fmt.verify(
        core["certificate"], manifest.signature_algorithm, drive.signature, drive.manifest_bytes
    )
    return core


def _plan(
    conn: apsw.Connection, core: dict[str, Any], manifest: fmt.Manifest, repository: str | None
) -> _Plan:
    named = repositories.by_name(conn, repository) if repository is not None else None
    agent_pks: dict[str, int] = {}
    to_approve: list[str] = []
    chosen: set[int] = set()
    for agent_id in manifest.agents:
        agent = agents.get(conn, core["id"], agent_id)
        if agent is not None and agent["state"] == "approved":
            if named is not None and agent["repository_id"] != named["id"]:
                current = repositories.by_id(conn, agent["repository_id"])["name"]
                raise Conflict(
                    f"agent {agent_id} of source {core['core_id']} replicates into repository"
                    f" {current}, not {named['name']}; consume without --repository"
                )
            agent_pks[agent_id] = agent["id"]
            chosen.add(agent["repository_id"])
        elif agent is not None and agent["state"] == "denied":
            raise Conflict(f"agent {agent_id} of source {core['core_id']} is denied on this core")
        elif named is None:
            raise Conflict(
                f"agent {agent_id} of source {core['core_id']} is not approved on this core:"
                " approve it first, or name --repository to approve it into"
            )
        else:
            to_approve.append(agent_id)
            chosen.add(named["id"])
    if len(chosen) != 1:
        raise Conflict(
            "the drive's agents replicate into different repositories; deduplication is per"
            " repository, so a drive is consumed into one"
        )
    return _Plan(core, chosen.pop(), agent_pks, to_approve)


def _approve(conn: apsw.Connection, plan: _Plan) -> None:
    """Approve the agents the operator named --repository for (new or pending ones)."""
    if not plan.to_approve:
        return
    agents.request(conn, plan.core["id"], [agents.AgentRequest(a) for a in plan.to_approve])
    repository = repositories.by_id(conn, plan.repository_id)["name"]
    for agent_id in plan.to_approve:
        agent = agents.get(conn, plan.core["id"], agent_id)
        assert agent is not None
        inventory.approve_agent(conn, agent["id"], repository, time.time())
        plan.agent_pks[agent_id] = agent["id"]


def _check_room(conn: apsw.Connection, drive: fmt.SeedDrive, repository_id: int) -> int:
    """Stored bytes of the drive's records the repository lacks; InsufficientStorage when
    the quota or the disk cannot take them."""
    needed = 0
    for batch in drive.record_sizes():
        present = records.present_keys(conn, repository_id, [key for key, _ in batch])
        needed += sum(size for key, size in batch if key not in present)
    left = sessions.room(conn, repository_id)
    if left is not None and needed > left:
        raise InsufficientStorage(
            f"the repository's quota has {max(left, 0)} bytes left; the drive's new records"
            f" need {needed} bytes",
            neededBytes=needed,
            availableBytes=max(left, 0),
        )
    free = shutil.disk_usage(Path(conn.filename).parent).free
    if needed > free:
        raise InsufficientStorage(
            f"the disk has {free} bytes free; the drive's new records need {needed} bytes"
        )
    return needed


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _import_records(
    conn: apsw.Connection, drive: fmt.SeedDrive, repository_id: int, now: float
) -> tuple[int, int, int]:
    """Store the drive's records the repository lacks, each verified again (decompress +
    key) right before it is stored, one transaction per batch. Returns (stored, already
    present, stored bytes)."""
    digest = fmt.RecordsDigest()
    stored = present = stored_bytes = 0
    for batch in drive.record_batches():
        for key, raw_length, codec, data in batch:
            digest.update(key, raw_length, codec, data)
        have = records.present_keys(conn, repository_id, [r[0] for r in batch])
        fresh = [r for r in batch if r[0] not in have]
        for key, raw_length, codec, data in fresh:
            fmt.verify_record(key, raw_length, codec, data)
        present += len(batch) - len(fresh)
        if not fresh:
            continue
        with transaction(conn):
            for key, raw_length, codec, data in fresh:
                if records.insert(conn, repository_id, key, raw_length, codec, data, now):
                    stored += 1
                    stored_bytes += len(data)
                else:
                    present += 1
    if digest.hexdigest() != drive.manifest.records_digest:
        raise fmt.DriveError("the drive's records changed while it was being read")
    return stored, present, stored_bytes


def _full_keys(
    conn: apsw.Connection, image: dict[str, Any], start: int, stop: int
) -> dict[int, bytes]:
    chain, _ = images.chain(conn, image)
    return {i: key for i, (key, _) in images.resolve(conn, chain, start, stop).items()}


def _same_image(
    conn: apsw.Connection, drive: fmt.SeedDrive, wanted: fmt.ManifestImage, held: dict[str, Any]
) -> bool:
    """True when the image on this core has exactly the drive's blocks."""
    if (held["size"], held["block_size"]) != (wanted.size, wanted.block_size):
        return False
    start = 0
    for keys in drive.block_map(wanted, sessions.COMMIT_STEP):
        resolved = _full_keys(conn, held, start, start + len(keys))
        if any(resolved.get(start + n) != key for n, key in enumerate(keys)):
            return False
        start += len(keys)
    return True


def _add_image(
    conn: apsw.Connection,
    drive: fmt.SeedDrive,
    wanted: fmt.ManifestImage,
    agent_pk: int,
    repository_id: int,
    now: float,
) -> None:
    """Insert the image as a commit would: recovery point, row, block map (diff against the
    parent's chain when the parent is here), stored block count, recovery point settled."""
    volume = wanted.driver_volume_id
    session = sessions.for_epoch(conn, agent_pk, volume, wanted.epoch_number)
    if session is not None:
        raise Conflict(
            f"a replication session ({session['session_id']}) is open for volume image"
            f" {wanted.name}; let it finish or end it, then consume again"
        )
    parent = None
    if wanted.previous_epoch_number is not None:
        parent = images.find(conn, agent_pk, volume, wanted.previous_epoch_number)
    if parent is not None and parent["block_size"] != wanted.block_size:
        raise Conflict(
            f"the parent of {wanted.name} on this core has block size {parent['block_size']},"
            f" the drive's image {wanted.block_size}"
        )
    parent_chain = images.chain(conn, parent)[0] if parent is not None else []
    checksum = protocol.KeyListChecksum()
    index = 0
    for keys in drive.block_map(wanted, sessions.COMMIT_STEP):
        for key in keys:
            checksum.update(index, key)
            index += 1
    point_pk = images.attach_recovery_point(
        conn,
        agent_pk,
        wanted.recovery_point_id,
        utc_timestamp(wanted.recovery_point_timestamp),
        wanted.volume_count,
        volume,
        now,
    )
    image_id = images.add_image(
        conn,
        {
            "agent_pk": agent_pk,
            "recovery_point_pk": point_pk,
            "repository_id": repository_id,
            "driver_volume_id": volume,
            "epoch_number": wanted.epoch_number,
            "previous_epoch_number": wanted.previous_epoch_number,
            "block_size": wanted.block_size,
            "size": wanted.size,
            "block_count": wanted.block_count,
            "stored_block_count": 0,
            "keys_checksum": checksum.hexdigest(),
            "session_id": f"seed-drive:{drive.manifest.drive_id}",
            "job_id": JOB_ID,
            "committed_at": now,
        },
    )
    stored = 0
    start = 0
    for keys in drive.block_map(wanted, sessions.COMMIT_STEP):
        stop = start + len(keys)
        stored += images.insert_changed_blocks(
            conn, image_id, parent_chain, repository_id, start, stop, list(enumerate(keys, start))
        )
        start = stop
    images.set_stored_block_count(conn, image_id, stored)
    images.settle_recovery_point(conn, point_pk, now)


def _orphans(conn: apsw.Connection, agent_pk: int, volume: str) -> dict[int, str]:
    """id -> name of the volume's images whose chain is broken."""
    return {
        image["id"]: images.name(image)
        for image in images.for_agent(conn, agent_pk)
        if image["driver_volume_id"] == volume and images.chain(conn, image)[1] is not None
    }


def _finish(
    conn: apsw.Connection,
    drive: fmt.SeedDrive,
    plan: _Plan,
    result: ConsumeResult,
    now: float,
) -> None:
    """The last transaction: everything the drive brings becomes visible at once."""
    manifest = drive.manifest
    if row(conn, "SELECT 1 AS x FROM seed_drives WHERE drive_id = ?", (manifest.drive_id,)):
        raise Conflict(f"seed drive {manifest.drive_id} was consumed meanwhile")
    core = cores.get(conn, plan.core["id"])
    if core["state"] != "approved":
        raise Conflict(f"source {core['core_id']} is no longer approved on this core")
    _approve(conn, plan)
    for batch in drive.record_sizes():
        keys = [key for key, _ in batch]
        if len(records.present_keys(conn, plan.repository_id, keys)) != len(keys):
            raise Conflict("records of the drive left the repository during the import; retry")
    conn.execute(
        "INSERT INTO seed_drives(drive_id, core_pk, source_core_id, created_at, consumed_at,"
        " repository_id, record_count, records_stored, stored_bytes, manifest)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            manifest.drive_id,
            core["id"],
            core["core_id"],
            manifest.created_at,
            now,
            plan.repository_id,
            manifest.record_count,
            result.records_stored,
            result.stored_bytes,
            drive.manifest_bytes.decode(),
        ),
    )
    drive_pk = conn.last_insert_rowid()
    volumes = {(plan.agent_pks[i.agent_id], i.driver_volume_id) for i in manifest.images}
    broken_before: dict[int, str] = {}
    for agent_pk, volume in volumes:
        broken_before.update(_orphans(conn, agent_pk, volume))
    ordered = sorted(
        manifest.images, key=lambda i: (i.agent_id, i.driver_volume_id, i.epoch_number)
    )
    for wanted in ordered:
        agent_pk = plan.agent_pks[wanted.agent_id]
        held = images.find(conn, agent_pk, wanted.driver_volume_id, wanted.epoch_number)
        if held is None:
            _add_image(conn, drive, wanted, agent_pk, plan.repository_id, now)
            outcome = "imported"
        elif _same_image(conn, drive, wanted, held):
            outcome = "already_present"
        else:
            raise Conflict(
                f"agent {wanted.agent_id} already has a volume image {wanted.name} on this core"
                " with other contents; the drive was made from another push state"
            )
        conn.execute(
            "INSERT INTO seed_drive_images(drive_pk, agent_pk, driver_volume_id, epoch_number,"
            " previous_epoch_number, outcome) VALUES (?, ?, ?, ?, ?, ?)",
            (
                drive_pk,
                agent_pk,
                wanted.driver_volume_id,
                wanted.epoch_number,
                wanted.previous_epoch_number,
                outcome,
            ),
        )
        result.images.append(
            {"agentId": wanted.agent_id, "volumeImage": wanted.name, "outcome": outcome}
        )
    broken_after: dict[int, str] = {}
    for agent_pk, volume in volumes:
        broken_after.update(_orphans(conn, agent_pk, volume))
    result.repaired = sorted(
        name for image_id, name in broken_before.items() if image_id not in broken_after
    )
    result.orphaned = sorted(broken_after.values())


def consume(
    conn: apsw.Connection,
    path: Path,
    repository: str | None = None,
    now: float | None = None,
) -> ConsumeResult:
    """Verify and import the seed drive at `path` (see the module docstring). Raises
    DriveError for a drive that is refused (nothing written) and ApiError subclasses when
    this core cannot take it (a conflict, a full quota)."""
    now = time.time() if now is None else now
    with fmt.SeedDrive(path) as drive:
        manifest = drive.manifest
        core = signer(conn, drive)
        this_core = meta.core_id(conn)
        if manifest.target_core_id is not None and manifest.target_core_id != this_core:
            raise fmt.DriveError(
                f"the drive was made for core {manifest.target_core_id}; this is {this_core}"
            )
        earlier = row(conn, "SELECT * FROM seed_drives WHERE drive_id = ?", (manifest.drive_id,))
        if earlier is not None:
            return ConsumeResult(
                manifest.drive_id, earlier["source_core_id"], True, earlier["consumed_at"]
            )
        plan = _plan(conn, core, manifest, repository)
        fmt.check_contents(drive)
        _check_room(conn, drive, plan.repository_id)
        result = ConsumeResult(
            manifest.drive_id,
            core["core_id"],
            False,
            now,
            repository=repositories.by_id(conn, plan.repository_id)["name"],
            record_count=manifest.record_count,
            approved_agents=list(plan.to_approve),
        )
        result.records_stored, result.records_present, result.stored_bytes = _import_records(
            conn, drive, plan.repository_id, now
        )
        # The images' committed_at is the time of the transaction that adds them (GC's rule
        # for whatever adds image blocks: store/gc.py).
        result.consumed_at = time.time()
        with transaction(conn):
            _finish(conn, drive, plan, result, result.consumed_at)
    return result


# --------------------------------------------------------------------------
# Consumed drives
# --------------------------------------------------------------------------


def _describe(drive: dict[str, Any], images_of: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "driveId": drive["drive_id"],
        "sourceCoreId": drive["source_core_id"],
        "createdAt": drive["created_at"],
        "consumedAt": iso_time(drive["consumed_at"]),
        "recordCount": drive["record_count"],
        "recordsStored": drive["records_stored"],
        "volumeImages": [
            {
                "driverVolumeId": i["driver_volume_id"],
                "epochNumber": i["epoch_number"],
                "previousEpochNumber": i["previous_epoch_number"],
                "outcome": i["outcome"],
            }
            for i in images_of
        ],
    }


def consumed_for_agent(conn: apsw.Connection, core_pk: int, agent_id: str) -> dict[str, Any]:
    """The drives consumed for the source's approved agent (NotFound for any other agent)."""
    agent = agents.get(conn, core_pk, agent_id)
    if agent is None or agent["state"] != "approved":
        raise NotFound(
            f"this source has no approved agent {agent_id!r} on this core", field="agentId"
        )
    found = rows(
        conn,
        "SELECT d.*, i.driver_volume_id, i.epoch_number, i.previous_epoch_number, i.outcome"
        " FROM seed_drive_images i JOIN seed_drives d ON d.id = i.drive_pk"
        " WHERE i.agent_pk = ? ORDER BY d.consumed_at, d.id, i.driver_volume_id, i.epoch_number",
        (agent["id"],),
    )
    drives: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for entry in found:
        drives.setdefault(entry["id"], (entry, []))[1].append(entry)
    described = [_describe(drive, of) for drive, of in drives.values()]
    return {
        "agentId": agent_id,
        "seedDriveIds": [d["driveId"] for d in described],
        "seedDrives": described,
    }


def list_all(conn: apsw.Connection) -> list[dict[str, Any]]:
    """Every consumed drive, oldest first, with its agents and images (for the operator)."""
    found = rows(
        conn,
        "SELECT d.*, r.name AS repository_name FROM seed_drives d"
        " JOIN repositories r ON r.id = d.repository_id ORDER BY d.consumed_at, d.id",
    )
    for drive in found:
        of = rows(
            conn,
            "SELECT i.*, a.agent_id FROM seed_drive_images i JOIN agents a ON a.id = i.agent_pk"
            " WHERE i.drive_pk = ? ORDER BY a.agent_id, i.driver_volume_id, i.epoch_number",
            (drive["id"],),
        )
        drive["agents"] = sorted({i["agent_id"] for i in of})
        drive["volume_images"] = [
            f"{i['driver_volume_id']}:{i['epoch_number']} ({i['outcome']})" for i in of
        ]
        drive["consumed"] = iso_time(drive["consumed_at"])
        drive["manifest"] = json.loads(drive["manifest"])
    return found
