"""Garbage collection without a server: what is garbage and what is not (images, binned
images, open sessions, young records), re-checks between mark and sweep, dry runs, and the
file giving its pages back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from inventory_helpers import (
    add_agent,
    add_source,
    new_database,
    random_bytes,
    read_back,
    store_push,
)
from replicore.store import db, gc, images, recycle_bin, retention, sessions
from replicore.store.db import transaction

BS = 4096
OLD = time.time() - 10 * 86400


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "replicore.db"


@pytest.fixture
def conn(path: Path) -> Any:
    connection = new_database(path)
    yield connection
    connection.close()


def record_count(conn: Any) -> int:
    return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])


def delete_point(conn: Any, agent_pk: int, volume: str, epoch: int) -> None:
    image = images.find(conn, agent_pk, volume, epoch)
    assert image is not None
    with transaction(conn):
        retention.delete_recovery_point(conn, image["recovery_point_pk"])


def two_agents(conn: Any) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """web01 and db01 in one repository, sharing 8 of their blocks; pushed long ago."""
    core = add_source(conn, "core-a")
    web01, db01 = add_agent(conn, core, "web01"), add_agent(conn, core, "db01")
    shared = random_bytes(1, 8 * BS)
    web = shared + random_bytes(2, 16 * BS)
    dbs = shared + random_bytes(3, 4 * BS)
    store_push(conn, web01, "c", 1, web, BS, now=OLD)
    store_push(conn, db01, "c", 1, dbs, BS, now=OLD)
    return web01, db01, web, dbs


def test_records_no_image_uses_are_collected_and_shared_ones_stay(conn, path):
    web01, db01, _, dbs = two_agents(conn)
    assert gc.collect(conn, path, min_age=3600).deleted_records == 0
    delete_point(conn, web01["id"], "c", 1)
    report = gc.collect(conn, path, min_age=3600)
    assert report.deleted_records == 16 and report.freed_raw_bytes == 16 * BS
    assert record_count(conn) == 12
    assert read_back(conn, db01["id"], "c", 1) == dbs


def test_marks_come_in_pages_and_the_collection_goes_through_them_all(conn, path):
    web01, _, _, _ = two_agents(conn)
    delete_point(conn, web01["id"], "c", 1)
    with transaction(conn):
        first = gc.mark(conn, web01["repository_id"], time.time(), limit=5)
        rest = gc.mark(conn, web01["repository_id"], time.time(), first.last_id, limit=50)
    assert len(first.candidates) == 5 and not first.complete
    assert len(rest.candidates) == 11 and rest.complete
    report = gc.collect(conn, path, min_age=3600, page=5, batch_size=3)
    assert report.deleted_records == 16 and report.candidates == 16


def test_dry_run_reports_and_changes_nothing(conn, path):
    web01, _, _, _ = two_agents(conn)
    delete_point(conn, web01["id"], "c", 1)
    dry = gc.collect(conn, path, min_age=3600, dry_run=True)
    assert dry.deleted_records == 16 and record_count(conn) == 28
    assert gc.collect(conn, path, min_age=3600).deleted_records == 16


def test_records_younger_than_the_session_timeout_stay(conn, path):
    core = add_source(conn, "core-a")
    web01 = add_agent(conn, core, "web01")
    store_push(conn, web01, "c", 1, random_bytes(4, 8 * BS), BS)  # records made now
    delete_point(conn, web01["id"], "c", 1)
    report = gc.collect(conn, path, min_age=3600)
    assert report.deleted_records == 0 and report.kept_young_or_pinned == 8
    assert gc.collect(conn, path, min_age=0).deleted_records == 8


def test_records_an_open_session_announced_stay_until_it_ends(conn, path):
    web01, _, web, _ = two_agents(conn)
    opened = store_push(conn, web01, "d", 1, web, BS, commit=False, now=OLD)
    delete_point(conn, web01["id"], "c", 1)
    assert gc.collect(conn, path, min_age=3600).deleted_records == 0
    with transaction(conn):
        sessions.discard(conn, opened["sessionPk"])
    assert gc.collect(conn, path, min_age=3600).deleted_records == 16


def test_binned_images_keep_their_records_until_purged(conn, path):
    web01, db01, web, dbs = two_agents(conn)
    with transaction(conn):
        entry = recycle_bin.bin_agent(conn, web01["id"], reason="source", deleted_by="t", now=0)
    assert gc.collect(conn, path, min_age=3600).deleted_records == 0
    with transaction(conn):
        restored = recycle_bin.restore(conn, entry["entryId"], 0)
    agent = db.row(conn, "SELECT * FROM agents WHERE agent_id = 'web01'")
    assert restored["recoveryPointCount"] == 1 and agent is not None
    assert read_back(conn, agent["id"], "c", 1) == web
    with transaction(conn):
        entry = recycle_bin.bin_agent(conn, agent["id"], reason="source", deleted_by="t", now=0)
        recycle_bin.purge(conn, entry["entryId"], 0)
    assert gc.collect(conn, path, min_age=3600).deleted_records == 16
    assert read_back(conn, db01["id"], "c", 1) == dbs


def test_a_record_referenced_by_an_image_committed_after_the_mark_is_not_swept(conn):
    web01, db01, web, _ = two_agents(conn)
    delete_point(conn, web01["id"], "c", 1)
    repository_id = web01["repository_id"]
    with transaction(conn):
        found = gc.mark(conn, repository_id, time.time())
    assert len(found.candidates) == 16
    # A push announces and commits those keys between the mark and the sweep: the
    # records are present, so nothing is sent, and the commit succeeds.
    store_push(conn, db01, "e", 1, web, BS, now=OLD)
    with transaction(conn):
        count, _, _ = gc.sweep(conn, found, found.candidates, 3600)
    assert count == 0
    assert read_back(conn, db01["id"], "e", 1) == web


def test_a_key_announced_after_the_mark_and_swept_fails_its_commit_cleanly(conn):
    web01, db01, web, _ = two_agents(conn)
    delete_point(conn, web01["id"], "c", 1)
    with transaction(conn):
        found = gc.mark(conn, web01["repository_id"], time.time())
    opened = store_push(conn, db01, "e", 1, web, BS, commit=False, now=OLD)
    assert opened["missing"] == []  # dedup: the source sends nothing
    with transaction(conn):
        assert gc.sweep(conn, found, found.candidates, 3600)[0] == 0  # pinned by the session
    assert record_count(conn) == 28


def test_collect_gives_the_pages_back_and_truncates_the_wal(conn, path):
    core = add_source(conn, "core-a")
    web01 = add_agent(conn, core, "web01")
    store_push(conn, web01, "c", 1, random_bytes(7, 8 * 1024 * 1024), 65536, now=OLD)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = gc.file_bytes(path)
    delete_point(conn, web01["id"], "c", 1)
    report = gc.collect(conn, path, min_age=3600)
    assert report.deleted_records == 128
    assert before - gc.file_bytes(path) >= 0.9 * 8 * 1024 * 1024
    assert Path(f"{path}-wal").stat().st_size == 0
    assert gc.freelist_pages(conn) == 0
