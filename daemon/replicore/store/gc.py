"""Garbage collection of records, and giving the freed pages back to the file system.

A record is garbage when, in its repository, no volume image references its key (live or in
the recycle bin), no open session has announced it (`session_blocks`) or reserved it
(`session_reservations`), and it is older than the session timeout (a source whose session
expired may come back and reuse what it sent: DESIGN, "GC").

Mark and sweep, crash-safe, without holding the write lock for long:
1. `mark` (one read snapshot per repository) lists the candidate records, with the time the
   mark began and the highest image row id it saw.
2. `sweep` deletes candidates in batches, one write transaction each; inside it, a candidate
   is dropped from the batch if it has become young, referenced by an image committed or
   added since the mark (row id above the mark's, or `committed_at` after the mark less
   `SLACK`), referenced by a binned image added since the mark, or pinned by any open session
   of the repository. A crash between batches leaves only deleted garbage behind. Commit
   re-checks the presence of every record in its own transaction (`sessions.commit`), so a
   key announced after the mark and swept before its commit fails that commit cleanly
   instead of producing an image with a missing record.
3. `vacuum_step` gives free pages back (`PRAGMA incremental_vacuum(N)`, the file was created
   with `auto_vacuum=INCREMENTAL`) in chunks, and a checkpoint step (`steps.CHECKPOINT`) runs
   `wal_checkpoint(TRUNCATE)` between chunks, so the WAL never grows by more than one chunk
   and the main file shrinks.

Anything else that adds image blocks referencing existing records (seed drives, restores)
must either set `committed_at` to the time of its transaction or re-check the records'
presence in that transaction.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import apsw

from .db import rows
from .steps import CHECKPOINT, Plan, read, run, scratch, write

#: Records deleted per sweep transaction.
SWEEP_BATCH = 2000
#: Candidates one mark lists at most (bounds memory; the next mark continues after them).
MARK_PAGE = 100_000
#: Pages given back per vacuum transaction (with 16 KiB pages: 64 MiB).
VACUUM_PAGES = 4096
#: Seconds an image's `committed_at` may precede the moment its transaction ran (the time is
#: taken before waiting for the write lock).
SLACK = 600.0


@dataclass
class Mark:
    """Candidates of one repository: (record id, key, stored bytes, raw bytes)."""

    repository_id: int
    started_at: float
    max_image_id: int
    max_binned_image_id: int
    candidates: list[tuple[int, bytes, int, int]] = field(default_factory=list)
    #: False when more candidates may follow `last_id` (the page was full).
    complete: bool = True

    @property
    def last_id(self) -> int:
        return self.candidates[-1][0] if self.candidates else 0


@dataclass
class Report:
    """What a collection did (or, dry, would do)."""

    dry_run: bool
    repositories: int = 0
    records_before: int = 0
    candidates: int = 0
    kept_young_or_pinned: int = 0
    deleted_records: int = 0
    freed_stored_bytes: int = 0
    freed_raw_bytes: int = 0
    vacuumed_pages: int = 0
    file_bytes_before: int = 0
    file_bytes_after: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add_sweep(self, batch: int, swept: tuple[int, int, int]) -> None:
        """Count a `sweep` of `batch` candidates: (records deleted, stored, raw bytes)."""
        count, stored, raw = swept
        self.deleted_records += count
        self.freed_stored_bytes += stored
        self.freed_raw_bytes += raw
        self.kept_young_or_pinned += batch - count


def repository_ids(conn: apsw.Connection) -> list[int]:
    return [r["repository_id"] for r in rows(conn, "SELECT repository_id FROM record_usage")]


def record_count(conn: apsw.Connection) -> int:
    return int(
        conn.execute("SELECT coalesce(sum(record_count), 0) FROM record_usage").fetchone()[0]
    )


_REFERENCED = """
  AND r.key NOT IN (SELECT ib.key FROM image_blocks ib JOIN volume_images vi
                    ON vi.id = ib.image_id WHERE vi.repository_id = :repo)
  AND r.key NOT IN (SELECT bb.key FROM bin_image_blocks bb JOIN bin_volume_images bv
                    ON bv.id = bb.image_id WHERE bv.repository_id = :repo)
  AND r.key NOT IN (SELECT b.key FROM session_blocks b JOIN sessions s
                    ON s.id = b.session_pk WHERE s.repository_id = :repo)
  AND r.key NOT IN (SELECT sr.key FROM session_reservations sr JOIN sessions s
                    ON s.id = sr.session_pk WHERE s.repository_id = :repo)
"""


def mark(
    conn: apsw.Connection,
    repository_id: int,
    now: float,
    after_id: int = 0,
    limit: int = MARK_PAGE,
) -> Mark:
    """The repository's unreferenced records with row id above `after_id`, at most `limit`
    of them in id order (call in one read transaction; `Mark.last_id` continues). The age
    rule is applied by `sweep` (reading `created_at` walks each record's blob)."""
    max_image = conn.execute("SELECT coalesce(max(id), 0) FROM volume_images").fetchone()[0]
    max_binned = conn.execute("SELECT coalesce(max(id), 0) FROM bin_volume_images").fetchone()[0]
    found = Mark(repository_id, now, int(max_image), int(max_binned))
    for record_id, key, stored, raw in conn.execute(
        "SELECT r.id, r.key, r.stored_length, r.raw_length FROM records r"
        f" WHERE r.repository_id = :repo AND r.id > :after {_REFERENCED}"
        " ORDER BY r.id LIMIT :limit",
        {"repo": repository_id, "after": after_id, "limit": limit},
    ):
        found.candidates.append((record_id, key, stored, raw))
    found.complete = len(found.candidates) < limit
    return found


def young(conn: apsw.Connection, ids: list[int], cutoff: float) -> set[int]:
    """Of the record ids, those created at or after `cutoff`."""
    found: set[int] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for (record_id,) in conn.execute(
            f"SELECT id FROM records WHERE id IN ({marks}) AND created_at >= ?", (*chunk, cutoff)
        ):
            found.add(record_id)
    return found


def sweep(
    conn: apsw.Connection,
    found: Mark,
    batch: list[tuple[int, bytes, int, int]],
    min_age: float,
    dry_run: bool = False,
) -> tuple[int, int, int]:
    """Delete the batch's records that are still garbage (re-checked here, see the module
    docstring; call in one write transaction). Returns (records, stored bytes, raw bytes)
    deleted; with `dry_run`, what would be deleted, nothing changes."""
    if not batch:
        return 0, 0, 0
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS gc_batch"
        " (id INTEGER PRIMARY KEY, key BLOB NOT NULL, stored INTEGER, raw INTEGER)"
    )
    conn.execute("DELETE FROM temp.gc_batch")
    try:
        conn.executemany(
            "INSERT INTO temp.gc_batch(id, key, stored, raw) VALUES (?, ?, ?, ?)", batch
        )
        too_young = young(conn, [b[0] for b in batch], found.started_at - min_age)
        conn.executemany("DELETE FROM temp.gc_batch WHERE id = ?", [(i,) for i in too_young])
        params = {
            "repo": found.repository_id,
            "max_image": found.max_image_id,
            "max_binned": found.max_binned_image_id,
            "since": found.started_at - SLACK,
        }
        conn.execute(
            "DELETE FROM temp.gc_batch WHERE key IN (SELECT ib.key FROM image_blocks ib"
            " JOIN volume_images vi ON vi.id = ib.image_id WHERE vi.repository_id = :repo"
            " AND (vi.id > :max_image OR vi.committed_at >= :since))",
            params,
        )
        conn.execute(
            "DELETE FROM temp.gc_batch WHERE key IN (SELECT bb.key FROM bin_image_blocks bb"
            " JOIN bin_volume_images bv ON bv.id = bb.image_id WHERE bv.repository_id = :repo"
            " AND bv.id > :max_binned)",
            params,
        )
        conn.execute(
            "DELETE FROM temp.gc_batch WHERE key IN (SELECT b.key FROM session_blocks b"
            " JOIN sessions s ON s.id = b.session_pk WHERE s.repository_id = :repo"
            " UNION ALL SELECT sr.key FROM session_reservations sr JOIN sessions s"
            " ON s.id = sr.session_pk WHERE s.repository_id = :repo)",
            params,
        )
        count, stored, raw = conn.execute(
            "SELECT count(*), coalesce(sum(stored), 0), coalesce(sum(raw), 0) FROM temp.gc_batch"
            " WHERE id IN (SELECT id FROM records)"
        ).fetchone()
        if not dry_run:
            conn.execute("DELETE FROM records WHERE id IN (SELECT id FROM temp.gc_batch)")
        return int(count), int(stored), int(raw)
    finally:
        conn.execute("DELETE FROM temp.gc_batch")


def freelist_pages(conn: apsw.Connection) -> int:
    return int(conn.execute("PRAGMA freelist_count").fetchone()[0])


def vacuum_step(conn: apsw.Connection, pages: int = VACUUM_PAGES) -> int:
    """Give up to `pages` free pages back (call in a write transaction); pages freed."""
    before = freelist_pages(conn)
    for _ in conn.execute(f"PRAGMA incremental_vacuum({int(pages)})"):
        pass
    return before - freelist_pages(conn)


def file_bytes(path: Path) -> int:
    """Bytes the database takes on disk: the main file plus its WAL."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += os.path.getsize(f"{path}{suffix}")
    return total


def steps(
    path: Path,
    *,
    min_age: float,
    dry_run: bool,
    now: Callable[[], float] = time.time,
    batch_size: int = SWEEP_BATCH,
    page: int = MARK_PAGE,
) -> Plan[Report]:
    """A whole collection, as the steps a driver runs one after the other (each `yield`
    is answered with its step's result); returns the report. The CLI drives it on a
    connection of its own (`collect`), the daemon through its database runner."""
    started = time.monotonic()
    report = Report(dry_run=dry_run, file_bytes_before=file_bytes(path))
    report.records_before = yield read(record_count)
    for repository_id in (yield read(repository_ids)):
        report.repositories += 1
        after = 0
        while True:
            found: Mark = yield read(mark, repository_id, now(), after, page)
            report.candidates += len(found.candidates)
            for start in range(0, len(found.candidates), batch_size):
                batch = found.candidates[start : start + batch_size]
                # A dry run's sweep changes only a temp table.
                step = scratch if dry_run else write
                swept = yield step(sweep, found, batch, min_age, dry_run)
                report.add_sweep(len(batch), swept)
            if found.complete:
                break
            after = found.last_id
    if not dry_run:
        while True:
            freed = yield write(vacuum_step)
            report.vacuumed_pages += freed
            yield CHECKPOINT
            if freed == 0:
                break
    report.file_bytes_after = file_bytes(path)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def collect(
    conn: apsw.Connection,
    path: Path,
    *,
    min_age: float,
    dry_run: bool = False,
    now: Callable[[], float] = time.time,
    batch_size: int = SWEEP_BATCH,
    page: int = MARK_PAGE,
) -> Report:
    """A whole collection on a connection outside any transaction (the CLI; the daemon runs
    the same steps through its writer). Safe while the daemon runs."""
    return run(
        conn,
        steps(path, min_age=min_age, dry_run=dry_run, now=now, batch_size=batch_size, page=page),
    )
