"""Verification of stored records: re-read, decompress and re-hash them, find the corrupt and
the missing ones, mark the volume images they damage, and forget corrupt records so that the
next push sends them again (self-healing).

Owns `image_damage` (one row per damaged block of a live volume image: the record it needs,
in which repository, and why: `corrupt` when the stored record failed verification and was
forgotten, `missing` when no record of that key was there), the trigger that clears marks
when a record of that key is stored again (a push, a seed drive), and `verify_runs` (one row
per run, for the operator).

What a run checks (`plan`):
1. Records. With no scope, every row of `records` (also those no image references any more:
   key negotiation would trust them), in id order. With a scope (some agents), the records
   their images reference. Each is decompressed and hashed; a record that does not decompress
   to `raw_length` bytes whose BLAKE3 is its key is corrupt.
2. Missing records: blocks of the live images in scope whose key has no record in the image's
   repository.
3. The damaged images: every live image whose block map names a corrupt or missing record
   (whatever agent or source it belongs to: a forgotten record is gone for all of them),
   and every later epoch that inherits such a block from it (does not override that block).
4. Unless it is a dry run: in one write transaction per batch, each corrupt record is checked
   again and deleted (its usage counters follow through the records triggers), and the
   damaged blocks are marked. The transferred-blocks bitmap and key negotiation then report
   the record as absent, so the next push of the image (which announces every block) sends
   it, and the trigger clears the marks: the image is whole again.

A commit re-checks that every announced record is present in its own transaction, so a
record forgotten while a session is open makes that commit fail with the block named (and the
source's next run sends it), never an image with a hole. Images in the recycle bin are not
checked for missing records (only live images are marked); their records are verified by a
full run like every other record.

`plan` is a generator of steps (read / write / verify), so that the same logic runs in a
command against its own connection (`run`) and in the daemon through `Database` off the trio
thread, cancellable between steps (`api/integrity.py`). Readers others reuse:
`damaged_images`, `damage_of_image`, `last_runs`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import apsw

from .. import protocol
from . import steps
from .db import row, rows

SCHEMA = """
CREATE TABLE image_damage (
    image_id      INTEGER NOT NULL REFERENCES volume_images(id) ON DELETE CASCADE,
    block_index   INTEGER NOT NULL,
    repository_id INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    key           BLOB NOT NULL CHECK (length(key) = 32),
    reason        TEXT NOT NULL CHECK (reason IN ('corrupt', 'missing')),
    found_at      REAL NOT NULL,
    PRIMARY KEY (image_id, block_index)
) STRICT, WITHOUT ROWID;
CREATE INDEX image_damage_record ON image_damage(repository_id, key);
CREATE TRIGGER image_damage_healed AFTER INSERT ON records
WHEN EXISTS (
    SELECT 1 FROM image_damage WHERE repository_id = NEW.repository_id AND key = NEW.key
)
BEGIN
    DELETE FROM image_damage WHERE repository_id = NEW.repository_id AND key = NEW.key;
END;
CREATE TABLE verify_runs (
    id                INTEGER PRIMARY KEY,
    started_at        REAL NOT NULL,
    finished_at       REAL NOT NULL,
    origin            TEXT NOT NULL CHECK (origin IN ('command', 'schedule')),
    scope             TEXT NOT NULL,
    dry_run           INTEGER NOT NULL,
    records_checked   INTEGER NOT NULL,
    bytes_checked     INTEGER NOT NULL,
    corrupt_records   INTEGER NOT NULL,
    missing_records   INTEGER NOT NULL,
    records_forgotten INTEGER NOT NULL,
    images_damaged    INTEGER NOT NULL
) STRICT;
"""

#: Stored bytes of records read per read step (and rows, whichever comes first).
READ_BUDGET_BYTES = 16 * 1024 * 1024
READ_BUDGET_ROWS = 2048
#: Block-map rows of one image read per step of a scoped run.
BLOCKS_PER_STEP = 8192
#: Keys per `IN (...)` list.
KEY_CHUNK = 500
#: Keys a scoped run remembers as verified (an image repeats keys, e.g. zero blocks).
SEEN_KEYS = 200_000
#: Corrupt records forgotten (and their marks written) per write transaction.
WRITE_BATCH = 500


# --------------------------------------------------------------------------
# Checking one record
# --------------------------------------------------------------------------


def check_record(key: bytes, codec: int, raw_length: int, data: bytes) -> str | None:
    """Why the stored record is not the block its key names, or None when it is."""
    try:
        raw = protocol.decompress_record(codec, data, raw_length)
    except protocol.ProtocolError as error:
        return f"cannot be decompressed: {error.message}"
    if protocol.record_key(raw) != key:
        return "its bytes do not match its key"
    return None


# --------------------------------------------------------------------------
# What a run reports
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """What a run covers: every record (agent_pks None), or the records of these agents."""

    agent_pks: tuple[int, ...] | None = None
    label: str = "all"


@dataclass
class Finding:
    """One corrupt or missing record and the image blocks that need it."""

    repository_id: int
    repository: str
    key: str
    reason: str  # corrupt | missing
    detail: str
    record_id: int | None = None
    forgotten: bool = False
    #: {"agentId", "sourceCoreId", "volumeImage", "blockIndex"} of every damaged block.
    blocks: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    scope: str
    dry_run: bool
    started_at: float
    finished_at: float = 0.0
    records_checked: int = 0
    #: Uncompressed bytes of the records checked.
    bytes_checked: int = 0
    corrupt: list[Finding] = field(default_factory=list)
    missing: list[Finding] = field(default_factory=list)
    records_forgotten: int = 0
    #: The images in scope marked damaged after the run (also marks of earlier runs).
    damaged_images: list[dict[str, Any]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.corrupt or self.missing or self.damaged_images)

    def as_json(self) -> dict[str, Any]:
        found = asdict(self)
        found["clean"] = self.clean
        return found


# --------------------------------------------------------------------------
# Steps: what the runner executes for the plan
# --------------------------------------------------------------------------


Plan = steps.Plan[Report]
_read, _write, _cpu = steps.read, steps.write, steps.cpu


def run(conn: apsw.Connection, plan: Plan) -> Report:
    """Execute a plan on a command's own connection (`steps.run`)."""
    return steps.run(conn, plan)


# --------------------------------------------------------------------------
# Store functions of the steps
# --------------------------------------------------------------------------

RecordRow = tuple[int, int, bytes, int, int, bytes]  # id, repository, key, codec, raw, data


def _take(cursor: apsw.Cursor) -> list[RecordRow]:
    """Rows of the cursor up to the read budget; the cursor is closed."""
    taken: list[RecordRow] = []
    budget = 0
    try:
        for found in cursor:
            taken.append(tuple(found))  # type: ignore[arg-type]
            budget += len(found[5])
            if budget >= READ_BUDGET_BYTES or len(taken) >= READ_BUDGET_ROWS:
                break
    finally:
        cursor.close()
    return taken


def records_after(conn: apsw.Connection, after_id: int) -> list[RecordRow]:
    """The next records by id, up to the read budget."""
    return _take(
        conn.execute(
            "SELECT id, repository_id, key, codec, raw_length, data FROM records"
            " WHERE id > ? ORDER BY id",
            (after_id,),
        )
    )


def records_of_keys(
    conn: apsw.Connection, repository_id: int, keys: list[bytes]
) -> list[RecordRow]:
    found: list[RecordRow] = []
    for start in range(0, len(keys), KEY_CHUNK):
        chunk = keys[start : start + KEY_CHUNK]
        marks = ",".join("?" * len(chunk))
        found += [
            tuple(r)  # type: ignore[misc]
            for r in conn.execute(
                "SELECT id, repository_id, key, codec, raw_length, data FROM records"
                f" WHERE repository_id = ? AND key IN ({marks})",
                (repository_id, *chunk),
            )
        ]
    return found


def scope_images(conn: apsw.Connection, agent_pks: tuple[int, ...] | None) -> list[dict[str, Any]]:
    """The live images of the scope (all when agent_pks is None), oldest epoch first."""
    sql = (
        "SELECT id, agent_pk, repository_id, driver_volume_id, epoch_number,"
        " previous_epoch_number, block_count FROM volume_images"
    )
    if agent_pks is None:
        return rows(conn, sql + " ORDER BY id")
    marks = ",".join("?" * len(agent_pks))
    return rows(conn, sql + f" WHERE agent_pk IN ({marks}) ORDER BY id", agent_pks)


def image_keys(conn: apsw.Connection, image_id: int, after_index: int) -> list[tuple[int, bytes]]:
    """The next (block index, key) pairs of an image's block map."""
    return [
        (index, key)
        for index, key in conn.execute(
            "SELECT block_index, key FROM image_blocks WHERE image_id = ? AND block_index > ?"
            " ORDER BY block_index LIMIT ?",
            (image_id, after_index, BLOCKS_PER_STEP),
        )
    ]


def missing_blocks(
    conn: apsw.Connection, image_ids: list[int]
) -> list[tuple[int, int, int, bytes]]:
    """(image id, block index, repository id, key) of the images' blocks whose record the
    image's repository does not hold."""
    found: list[tuple[int, int, int, bytes]] = []
    for image_id in image_ids:
        found += [
            tuple(r)  # type: ignore[misc]
            for r in conn.execute(
                "SELECT b.image_id, b.block_index, v.repository_id, b.key FROM image_blocks b"
                " JOIN volume_images v ON v.id = b.image_id WHERE b.image_id = ?"
                " AND NOT EXISTS (SELECT 1 FROM records r"
                " WHERE r.repository_id = v.repository_id AND r.key = b.key)",
                (image_id,),
            )
        ]
    return found


def holders(
    conn: apsw.Connection, repository_id: int, keys: list[bytes]
) -> list[tuple[int, int, int, bytes]]:
    """(image id, block index, repository id, key) of every live image block of the
    repository whose block map names one of `keys`."""
    found: list[tuple[int, int, int, bytes]] = []
    for start in range(0, len(keys), KEY_CHUNK):
        chunk = keys[start : start + KEY_CHUNK]
        marks = ",".join("?" * len(chunk))
        found += [
            tuple(r)  # type: ignore[misc]
            for r in conn.execute(
                "SELECT b.image_id, b.block_index, v.repository_id, b.key FROM image_blocks b"
                " JOIN volume_images v ON v.id = b.image_id"
                f" WHERE v.repository_id = ? AND b.key IN ({marks})",
                (repository_id, *chunk),
            )
        ]
    return found


def inheritors(
    conn: apsw.Connection, damaged: list[tuple[int, int, int, bytes]]
) -> list[tuple[int, int, int, bytes]]:
    """The later epochs that read each damaged (image, block) through their parent chain
    (they hold no block of their own at that index), with the same repository and key."""
    found: list[tuple[int, int, int, bytes]] = []
    children: dict[tuple[int, str], dict[int, list[dict[str, Any]]]] = {}
    images_by_id: dict[int, dict[str, Any]] = {}
    for image_id, index, repository_id, key in damaged:
        image = images_by_id.get(image_id) or row(
            conn,
            "SELECT id, agent_pk, driver_volume_id, epoch_number FROM volume_images WHERE id = ?",
            (image_id,),
        )
        if image is None:
            continue
        volume = (image["agent_pk"], image["driver_volume_id"])
        if volume not in children:
            tree: dict[int, list[dict[str, Any]]] = {}
            for child in rows(
                conn,
                "SELECT id, epoch_number, previous_epoch_number, block_count FROM volume_images"
                " WHERE agent_pk = ? AND driver_volume_id = ?",
                volume,
            ):
                if child["previous_epoch_number"] is not None:
                    tree.setdefault(child["previous_epoch_number"], []).append(child)
            children[volume] = tree
        tree = children[volume]
        queue = list(tree.get(image["epoch_number"], []))
        while queue:
            child = queue.pop()
            if index >= child["block_count"]:
                continue
            if row(
                conn,
                "SELECT 1 AS x FROM image_blocks WHERE image_id = ? AND block_index = ?",
                (child["id"], index),
            ):
                continue  # the child holds its own block there
            found.append((child["id"], index, repository_id, key))
            queue += tree.get(child["epoch_number"], [])
    return found


def describe_blocks(
    conn: apsw.Connection, blocks: list[tuple[int, int, int, bytes]]
) -> list[dict[str, Any] | None]:
    """Who each (image, block) belongs to, for the report (None for an image deleted
    meanwhile); in the order given."""
    described: list[dict[str, Any] | None] = []
    cache: dict[int, dict[str, Any] | None] = {}
    for image_id, index, _repository_id, _key in blocks:
        if image_id not in cache:
            cache[image_id] = row(
                conn,
                "SELECT a.agent_id, c.core_id, v.driver_volume_id, v.epoch_number"
                " FROM volume_images v JOIN agents a ON a.id = v.agent_pk"
                " JOIN master_cores c ON c.id = a.core_pk WHERE v.id = ?",
                (image_id,),
            )
        image = cache[image_id]
        described.append(
            None
            if image is None
            else {
                "agentId": image["agent_id"],
                "sourceCoreId": image["core_id"],
                "volumeImage": f"{image['driver_volume_id']}:{image['epoch_number']}",
                "blockIndex": index,
            }
        )
    return described


def repository_names(conn: apsw.Connection) -> dict[int, str]:
    return {r["id"]: r["name"] for r in rows(conn, "SELECT id, name FROM repositories")}


def forget_and_mark(
    conn: apsw.Connection,
    corrupt: list[tuple[int, int, bytes]],
    marks: list[tuple[int, int, int, bytes, str]],
    now: float,
) -> list[int]:
    """Delete the corrupt records (id, repository, key) that are still there and still
    corrupt; then mark the damaged blocks (image, index, repository, key, reason) whose record
    is absent. Returns the ids of the records deleted."""
    forgotten: list[int] = []
    for record_id, repository_id, key in corrupt:
        found = conn.execute(
            "SELECT codec, raw_length, data FROM records WHERE id = ? AND repository_id = ?"
            " AND key = ?",
            (record_id, repository_id, key),
        ).fetchone()
        if found is None or check_record(key, *found) is None:
            continue
        conn.execute("DELETE FROM records WHERE id = ?", (record_id,))
        forgotten.append(record_id)
    conn.executemany(
        "INSERT INTO image_damage(image_id, block_index, repository_id, key, reason, found_at)"
        " SELECT ?1, ?2, ?3, ?4, ?5, ?6"
        " WHERE EXISTS (SELECT 1 FROM volume_images WHERE id = ?1)"
        " AND NOT EXISTS (SELECT 1 FROM records WHERE repository_id = ?3 AND key = ?4)"
        " ON CONFLICT (image_id, block_index) DO NOTHING",
        [(*mark, now) for mark in marks],
    )
    return forgotten


def clear_healed(conn: apsw.Connection) -> int:
    """Drop marks whose record is there again (the insert trigger normally does it)."""
    conn.execute(
        "DELETE FROM image_damage WHERE EXISTS (SELECT 1 FROM records r"
        " WHERE r.repository_id = image_damage.repository_id AND r.key = image_damage.key)"
    )
    return conn.changes()


def record_run(conn: apsw.Connection, report: Report, origin: str) -> None:
    conn.execute(
        "INSERT INTO verify_runs(started_at, finished_at, origin, scope, dry_run,"
        " records_checked, bytes_checked, corrupt_records, missing_records, records_forgotten,"
        " images_damaged) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            report.started_at,
            report.finished_at,
            origin,
            report.scope,
            int(report.dry_run),
            report.records_checked,
            report.bytes_checked,
            len(report.corrupt),
            len(report.missing),
            report.records_forgotten,
            len(report.damaged_images),
        ),
    )


# --------------------------------------------------------------------------
# Readers for other parts (export, inventory, status, console)
# --------------------------------------------------------------------------


def damaged_images(
    conn: apsw.Connection, agent_pks: tuple[int, ...] | None = None
) -> list[dict[str, Any]]:
    """The live images marked damaged (of these agents, or all): agent, source, volume image,
    damaged block count, reasons, when first found."""
    where, args = "", ()
    if agent_pks is not None:
        where = f" WHERE v.agent_pk IN ({','.join('?' * len(agent_pks))})"
        args = agent_pks
    return rows(
        conn,
        "SELECT v.id AS image_id, a.agent_id AS agentId, c.core_id AS sourceCoreId,"
        " v.driver_volume_id || ':' || v.epoch_number AS volumeImage,"
        " count(*) AS damagedBlocks, group_concat(DISTINCT d.reason) AS reasons,"
        " min(d.found_at) AS foundAt"
        " FROM image_damage d JOIN volume_images v ON v.id = d.image_id"
        " JOIN agents a ON a.id = v.agent_pk JOIN master_cores c ON c.id = a.core_pk"
        f"{where} GROUP BY v.id ORDER BY a.agent_id, v.driver_volume_id, v.epoch_number",
        args,
    )


def damage_of_image(conn: apsw.Connection, image_id: int) -> list[dict[str, Any]]:
    """The damaged blocks of one image: block index, key (hex), reason, found_at."""
    return [
        {**r, "key": r["key"].hex()}
        for r in rows(
            conn,
            "SELECT block_index, key, reason, found_at FROM image_damage WHERE image_id = ?"
            " ORDER BY block_index",
            (image_id,),
        )
    ]


def last_runs(conn: apsw.Connection, limit: int = 10) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM verify_runs ORDER BY id DESC LIMIT ?", (limit,))


# --------------------------------------------------------------------------
# The plan of one run
# --------------------------------------------------------------------------


def _verify_rows(found: list[RecordRow]) -> tuple[list[tuple[RecordRow, str]], int]:
    """(corrupt rows with why, uncompressed bytes checked); the data of good rows is dropped."""
    bad: list[tuple[RecordRow, str]] = []
    checked = 0
    for record in found:
        _id, _repository, key, codec, raw_length, data = record
        reason = check_record(key, codec, raw_length, data)
        checked += raw_length
        if reason is not None:
            bad.append((record, reason))
    return bad, checked


def plan(scope: Scope, *, dry_run: bool = False, origin: str = "command") -> Plan:
    """The steps of one verify run over `scope`; returns its Report."""
    report = Report(scope=scope.label, dry_run=dry_run, started_at=time.time())
    names: dict[int, str] = yield _read(repository_names)
    corrupt: dict[tuple[int, bytes], Finding] = {}

    def note_corrupt(bad: list[tuple[RecordRow, str]]) -> None:
        for (record_id, repository_id, key, _c, _r, _d), reason in bad:
            corrupt.setdefault(
                (repository_id, key),
                Finding(
                    repository_id,
                    names.get(repository_id, str(repository_id)),
                    key.hex(),
                    "corrupt",
                    f"the stored record {reason}",
                    record_id,
                ),
            )

    images: list[dict[str, Any]] = yield _read(scope_images, scope.agent_pks)
    if scope.agent_pks is None:
        after = 0
        while True:
            found: list[RecordRow] = yield _read(records_after, after)
            if not found:
                break
            after = found[-1][0]
            bad, checked = yield _cpu(_verify_rows, found)
            report.records_checked += len(found)
            report.bytes_checked += checked
            note_corrupt(bad)
    else:
        seen: OrderedDict[tuple[int, bytes], None] = OrderedDict()
        for image in images:
            last = -1
            while True:
                pairs: list[tuple[int, bytes]] = yield _read(image_keys, image["id"], last)
                if not pairs:
                    break
                last = pairs[-1][0]
                repository_id = image["repository_id"]
                keys = list(dict.fromkeys(k for _, k in pairs if (repository_id, k) not in seen))
                if not keys:
                    continue
                found = yield _read(records_of_keys, repository_id, keys)
                bad, checked = yield _cpu(_verify_rows, found)
                report.records_checked += len(found)
                report.bytes_checked += checked
                note_corrupt(bad)
                for key in keys:
                    seen[(repository_id, key)] = None
                while len(seen) > SEEN_KEYS:
                    seen.popitem(last=False)

    # Missing records of the images in scope.
    missing_found: list[tuple[int, int, int, bytes]] = []
    ids = [image["id"] for image in images]
    for start in range(0, len(ids), 64):
        missing_found += yield _read(missing_blocks, ids[start : start + 64])
    missing: dict[tuple[int, bytes], Finding] = {}
    for _image_id, _index, repository_id, key in missing_found:
        missing.setdefault(
            (repository_id, key),
            Finding(
                repository_id,
                names.get(repository_id, str(repository_id)),
                key.hex(),
                "missing",
                "no record of this key is stored in the repository",
            ),
        )

    # Every image block that needs a corrupt or missing record, directly or inherited.
    direct = list(missing_found)
    by_repository: dict[int, list[bytes]] = {}
    for repository_id, key in corrupt:
        by_repository.setdefault(repository_id, []).append(key)
    for repository_id, keys in by_repository.items():
        direct += yield _read(holders, repository_id, keys)
    direct = list(dict.fromkeys(direct))
    inherited: list[tuple[int, int, int, bytes]] = yield _read(inheritors, direct)
    damaged = list(dict.fromkeys(direct + inherited))
    described: list[dict[str, Any] | None] = yield _read(describe_blocks, damaged)
    for (_image_id, _index, repository_id, key), where in zip(damaged, described, strict=True):
        finding = corrupt.get((repository_id, key)) or missing.get((repository_id, key))
        if finding is not None and where is not None:
            finding.blocks.append(where)

    if not dry_run:
        # Each corrupt record is forgotten in the same transaction that marks the blocks
        # needing it; then the blocks of missing records are marked.
        marks_of: dict[tuple[int, bytes], list[tuple[int, int, int, bytes, str]]] = {}
        for image_id, index, repository_id, key in damaged:
            reason = "corrupt" if (repository_id, key) in corrupt else "missing"
            marks_of.setdefault((repository_id, key), []).append(
                (image_id, index, repository_id, key, reason)
            )
        now = time.time()
        forgotten: set[int] = set()
        findings = list(corrupt.values())
        for start in range(0, len(findings), WRITE_BATCH):
            batch = findings[start : start + WRITE_BATCH]
            records = [(f.record_id, f.repository_id, bytes.fromhex(f.key)) for f in batch]
            marks = [m for _, r, k in records for m in marks_of.pop((r, k), [])]
            forgotten.update((yield _write(forget_and_mark, records, marks, now)))
        rest = [m for group in marks_of.values() for m in group]
        for start in range(0, len(rest), WRITE_BATCH * 8):
            yield _write(forget_and_mark, [], rest[start : start + WRITE_BATCH * 8], now)
        for finding in findings:
            finding.forgotten = finding.record_id in forgotten
        report.records_forgotten = len(forgotten)
        yield _write(clear_healed)

    report.corrupt = list(corrupt.values())
    report.missing = list(missing.values())
    report.damaged_images = yield _read(damaged_images, scope.agent_pks)
    for image in report.damaged_images:
        image.pop("image_id", None)
    report.finished_at = time.time()
    yield _write(record_run, report, origin)
    return report
