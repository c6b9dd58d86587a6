"""The data path's store, without a server: sessions, key negotiation, reservations, commit
(diff against the parent, inherited blocks, size changes), reading images back, orphans."""

from __future__ import annotations

import time
from typing import Any

import apsw
import pytest

from datapath_helpers import KIB, key_entries, keys_checksum, make_image, mutate, split
from replicore import protocol
from replicore.errors import Conflict, InsufficientStorage, NotFound, Unprocessable
from replicore.store import db, images, records, repositories, sessions

BS = 4 * KIB


def add_agent(
    conn: apsw.Connection,
    agent_id: str = "web01",
    repository: str = "repo",
    quota: int | None = None,
) -> dict[str, Any]:
    found = db.row(conn, "SELECT id FROM repositories WHERE name = ?", (repository,))
    repository_id = found["id"] if found else repositories.create(conn, repository, quota)
    conn.execute(
        "INSERT INTO master_cores(core_id, fingerprint, certificate, state, method, requested_at)"
        " VALUES (?, ?, '', 'approved', 'demand', 0)",
        (f"core-{agent_id}-{repository}", f"fp-{agent_id}-{repository}"),
    )
    core_pk = conn.last_insert_rowid()
    conn.execute(
        "INSERT INTO agents(core_pk, agent_id, state, repository_id, created_at)"
        " VALUES (?, ?, 'approved', ?, 0)",
        (core_pk, agent_id, repository_id),
    )
    agent = db.row(conn, "SELECT * FROM agents WHERE id = ?", (conn.last_insert_rowid(),))
    assert agent is not None
    return agent


def request(
    epoch: int, size: int, previous: int | None = None, rp: str | None = None, volume: str = "vol"
) -> sessions.SessionRequest:
    return sessions.SessionRequest(
        job_id="job",
        driver_volume_id=volume,
        epoch_number=epoch,
        previous_epoch_number=previous,
        block_size=BS,
        size=size,
        recovery_point_id=rp or f"rp{epoch}",
        recovery_point_timestamp="2026-11-27T10:00:00Z",
        volume_count=1,
    )


def verified(blocks: list[bytes], indices: list[int]) -> list[sessions.VerifiedRecord]:
    out = []
    for i in indices:
        codec, payload = protocol.compress_block(blocks[i])
        out.append(
            sessions.VerifiedRecord(
                i, protocol.record_key(blocks[i]), len(blocks[i]), codec, payload
            )
        )
    return out


def push(
    conn: apsw.Connection,
    agent: dict[str, Any],
    image: bytes,
    epoch: int,
    previous: int | None = None,
    only: list[int] | None = None,
) -> tuple[dict[str, Any], list[int]]:
    """Open, announce, send the missing records and commit, in transactions as the API does."""
    blocks = split(image, BS)
    now = time.time()
    with db.transaction(conn):
        opened = sessions.open_session(conn, agent, request(epoch, len(image), previous), now)
    session = db.row(conn, "SELECT * FROM sessions WHERE session_id = ?", (opened["sessionId"],))
    assert session is not None
    entries = key_entries(blocks, only)
    with db.transaction(conn):
        missing = sessions.record_keys(conn, session["id"], entries, now)
    with db.transaction(conn):
        stored, _, error = sessions.store_records(
            conn, session["id"], verified(blocks, missing), now
        )
    assert error is None and stored == len(missing)
    with db.transaction(conn):
        answer = sessions.commit(conn, session["id"], len(blocks), keys_checksum(entries), now)
    image_row = images.find(conn, agent["id"], "vol", epoch)
    assert image_row is not None and answer["committed"]
    return image_row, missing


def exported(conn: apsw.Connection, image_id: int) -> bytes:
    return b"".join(images.read_image(conn, image_id))


def test_base_image_reads_back_exactly_with_a_short_last_block(conn):
    agent = add_agent(conn)
    image = make_image(1, 40 * BS + 123, BS)
    row, missing = push(conn, agent, image, 1)
    assert exported(conn, row["id"]) == image
    assert row["block_count"] == 41 and row["stored_block_count"] == 41
    # duplicates within the image are asked once: fewer missing than distinct blocks + 1
    assert len(missing) == len({protocol.record_key(b) for b in split(image, BS)})


def test_incremental_stores_only_changed_blocks_and_both_epochs_read_back(conn):
    agent = add_agent(conn)
    base = make_image(2, 64 * BS, BS)
    changed = mutate(base, BS, [3, 17, 40], seed=9)
    first, _ = push(conn, agent, base, 1)
    second, missing = push(conn, agent, changed, 2, previous=1)
    assert sorted(missing) == [3, 17, 40]
    assert second["stored_block_count"] == 3
    assert exported(conn, first["id"]) == base
    assert exported(conn, second["id"]) == changed


def test_change_tracking_session_inherits_unannounced_blocks_from_the_parent(conn):
    agent = add_agent(conn)
    base = make_image(3, 32 * BS, BS)
    changed = mutate(base, BS, [0, 31], seed=4)
    push(conn, agent, base, 1)
    second, _ = push(conn, agent, changed, 2, previous=1, only=[0, 31])
    assert second["stored_block_count"] == 2
    assert exported(conn, second["id"]) == changed


def test_grown_and_shrunk_volumes_keep_exact_sizes(conn):
    agent = add_agent(conn)
    base = make_image(5, 10 * BS + 100, BS)
    grown = base[: 10 * BS] + make_image(6, 3 * BS + 7, BS)
    shrunk = grown[: 4 * BS + 1]
    push(conn, agent, base, 1)
    second, _ = push(conn, agent, grown, 2, previous=1)
    third, _ = push(conn, agent, shrunk, 3, previous=2)
    assert exported(conn, second["id"]) == grown
    assert exported(conn, third["id"]) == shrunk
    # the short last block of epoch 1 cannot be inherited by the grown epoch 2
    assert second["stored_block_count"] == 4


def test_unannounced_blocks_without_a_parent_to_inherit_from_are_missing(conn):
    agent = add_agent(conn)
    base = make_image(7, 8 * BS, BS)
    push(conn, agent, base, 1)
    grown = base + make_image(8, 2 * BS, BS)
    blocks = split(grown, BS)
    now = time.time()
    with db.transaction(conn):
        opened = sessions.open_session(conn, agent, request(2, len(grown), 1), now)
    pk = db.row(conn, "SELECT id FROM sessions WHERE session_id = ?", (opened["sessionId"],))["id"]
    entries = key_entries(blocks, [0])
    with db.transaction(conn):
        sessions.store_records(
            conn, pk, verified(blocks, sessions.record_keys(conn, pk, entries, now)), now
        )
    with pytest.raises(Unprocessable) as refused, db.transaction(conn):
        sessions.commit(conn, pk, len(blocks), keys_checksum(entries), now)
    assert refused.value.extra["blocksWithoutKey"] == 2
    assert "2 of 10 blocks are missing" in refused.value.message
    assert images.find(conn, agent["id"], "vol", 2) is None


def test_orphaned_image_is_stored_flagged_and_readable_once_its_parent_arrives(conn):
    agent = add_agent(conn)
    base = make_image(10, 16 * BS, BS)
    later = mutate(base, BS, [5], seed=1)
    orphan, _ = push(conn, agent, later, 7, previous=6)
    reason = images.orphan_reason(conn, orphan["id"])
    assert reason is not None and "epoch 6" in reason
    with pytest.raises(images.OrphanedImage):
        exported(conn, orphan["id"])
    push(conn, agent, base, 6)
    assert images.orphan_reason(conn, orphan["id"]) is None
    assert exported(conn, orphan["id"]) == later


def test_keys_reserve_each_missing_record_once_and_storing_releases_it(conn):
    agent = add_agent(conn, quota=1024 * KIB)
    blocks = [b"\x01" * BS, b"\x02" * BS, b"\x01" * BS, bytes(BS)]
    now = time.time()
    with db.transaction(conn):
        opened = sessions.open_session(conn, agent, request(1, 4 * BS), now)
    pk = db.row(conn, "SELECT id FROM sessions WHERE session_id = ?", (opened["sessionId"],))["id"]
    entries = key_entries(blocks)
    with db.transaction(conn):
        missing = sessions.record_keys(conn, pk, entries, now)
    assert missing == [0, 1, 3]
    assert sessions.reserved_bytes(conn, agent["repository_id"]) == 3 * BS
    with db.transaction(conn):  # re-announcing reserves nothing more
        sessions.record_keys(conn, pk, entries, now)
    assert sessions.reserved_bytes(conn, agent["repository_id"]) == 3 * BS
    with db.transaction(conn):
        sessions.store_records(conn, pk, verified(blocks, [0]), now)
    assert sessions.reserved_bytes(conn, agent["repository_id"]) == 2 * BS
    used = records.used_bytes(conn, agent["repository_id"])
    assert 0 < used < BS  # stored compressed
    assert repositories.used_bytes(conn, agent["repository_id"]) == used
    with db.transaction(conn):
        sessions.discard(conn, pk)
    assert sessions.reserved_bytes(conn, agent["repository_id"]) == 0
    assert records.usage(conn, agent["repository_id"])["record_count"] == 1


def test_a_batch_over_quota_reserves_nothing_and_records_no_keys(conn):
    agent = add_agent(conn, quota=3 * BS)
    blocks = [bytes([i]) * BS for i in range(8)]
    now = time.time()
    with db.transaction(conn):
        opened = sessions.open_session(conn, agent, request(1, 8 * BS), now)
    pk = db.row(conn, "SELECT id FROM sessions WHERE session_id = ?", (opened["sessionId"],))["id"]
    with pytest.raises(InsufficientStorage), db.transaction(conn):
        sessions.record_keys(conn, pk, key_entries(blocks), now)
    assert sessions.reserved_bytes(conn, agent["repository_id"]) == 0
    assert conn.execute("SELECT count(*) FROM session_blocks").fetchone()[0] == 0
    with db.transaction(conn):  # a batch that fits is fine
        assert sessions.record_keys(conn, pk, key_entries(blocks, [0, 1, 2]), now) == [0, 1, 2]


def test_disk_space_bounds_reservations_too(conn):
    agent = add_agent(conn)
    blocks = [bytes([i]) * BS for i in range(4)]
    now = time.time()
    with db.transaction(conn):
        opened = sessions.open_session(conn, agent, request(1, 4 * BS), now)
    pk = db.row(conn, "SELECT id FROM sessions WHERE session_id = ?", (opened["sessionId"],))["id"]
    with pytest.raises(InsufficientStorage), db.transaction(conn):
        sessions.record_keys(conn, pk, key_entries(blocks), now, disk_free=3 * BS)


def test_records_are_deduplicated_per_repository_only(conn):
    one = add_agent(conn, "a", "one")
    same_repository = add_agent(conn, "b", "one")
    other_repository = add_agent(conn, "a", "two")
    image = make_image(12, 16 * BS, BS)
    _, first = push(conn, one, image, 1)
    _, shared = push(conn, same_repository, image, 1)
    _, separate = push(conn, other_repository, image, 1)
    assert first and shared == [] and sorted(separate) == sorted(first)


def test_store_refuses_records_of_blocks_never_announced_and_keeps_earlier_ones(conn):
    agent = add_agent(conn)
    blocks = [bytes([i + 1]) * BS for i in range(4)]
    now = time.time()
    with db.transaction(conn):
        opened = sessions.open_session(conn, agent, request(1, 4 * BS), now)
    pk = db.row(conn, "SELECT id FROM sessions WHERE session_id = ?", (opened["sessionId"],))["id"]
    with db.transaction(conn):
        sessions.record_keys(conn, pk, key_entries(blocks, [0, 1]), now)
    batch = verified(blocks, [0, 2, 1])
    with db.transaction(conn):
        stored, already, error = sessions.store_records(conn, pk, batch, now)
    assert (stored, already) == (1, 0)
    assert error is not None and error.extra["blockIndex"] == 2
    with db.transaction(conn):
        bitmap = sessions.transferred_bitmap(conn, sessions.get(conn, pk))
    assert bitmap == b"\x01"


def test_key_entries_are_checked_against_the_image(conn):
    session = {"block_count": 3, "size": 2 * BS + 10, "block_size": BS}
    key = bytes(32)
    ok = [protocol.KeyEntry(0, key, BS), protocol.KeyEntry(2, key, 10)]
    assert sessions.check_key_entries(session, ok) == ok
    for bad, index in (
        ([protocol.KeyEntry(3, key, BS)], 3),
        ([protocol.KeyEntry(2, key, BS)], 2),
        ([protocol.KeyEntry(1, key, BS - 1)], 1),
        ([protocol.KeyEntry(1, key, BS), protocol.KeyEntry(1, key, BS)], 1),
    ):
        with pytest.raises(Unprocessable) as refused:
            sessions.check_key_entries(session, bad)
        assert refused.value.extra["blockIndex"] == index


def test_reopening_an_epoch_resumes_only_an_identical_session(conn):
    agent = add_agent(conn)
    now = time.time()
    with db.transaction(conn):
        first = sessions.open_session(conn, agent, request(1, 4 * BS), now)
        again = sessions.open_session(conn, agent, request(1, 4 * BS), now)
    assert again["sessionId"] == first["sessionId"] and again["resumed"]
    with pytest.raises(Conflict) as refused, db.transaction(conn):
        sessions.open_session(conn, agent, request(1, 5 * BS), now)
    assert refused.value.field == "size"


def test_committed_epoch_is_refused_naming_the_latest(conn):
    agent = add_agent(conn)
    image = make_image(13, 4 * BS, BS)
    push(conn, agent, image, 1)
    push(conn, agent, image, 2, previous=1)
    with pytest.raises(Conflict) as refused, db.transaction(conn):
        sessions.open_session(conn, agent, request(1, 4 * BS), time.time())
    assert refused.value.extra["committedEpochNumber"] == 2


def test_recovery_point_completes_with_its_last_volume(conn):
    agent = add_agent(conn)
    now = time.time()
    answers = []
    for volume in ("c", "d"):
        blocks = [volume.encode() * BS]
        req = sessions.SessionRequest(
            "job", volume, 1, None, BS, BS, "rp", "2026-11-27T10:00:00Z", 2
        )
        with db.transaction(conn):
            sid = sessions.open_session(conn, agent, req, now)["sessionId"]
            pk = db.row(conn, "SELECT id FROM sessions WHERE session_id = ?", (sid,))["id"]
            sessions.store_records(
                conn,
                pk,
                verified(blocks, sessions.record_keys(conn, pk, key_entries(blocks), now)),
                now,
            )
            answers.append(sessions.commit(conn, pk, 1, keys_checksum(key_entries(blocks)), now))
    assert [a["recoveryPointComplete"] for a in answers] == [False, True]
    point = images.find_recovery_point(conn, agent["id"], "rp")
    assert point is not None and point["complete"] == 1


def test_expiry_discards_idle_sessions_but_keeps_their_records(conn):
    agent = add_agent(conn)
    blocks = [b"\x05" * BS]
    with db.transaction(conn):
        sid = sessions.open_session(conn, agent, request(1, BS), 100.0)["sessionId"]
        pk = db.row(conn, "SELECT id FROM sessions WHERE session_id = ?", (sid,))["id"]
        sessions.store_records(
            conn,
            pk,
            verified(blocks, sessions.record_keys(conn, pk, key_entries(blocks), 100.0)),
            100.0,
        )
    with db.transaction(conn):
        assert sessions.expire(conn, 150.0, frozenset({sid})) == []
        assert sessions.expire(conn, 150.0, frozenset()) == [sid]
    with pytest.raises(NotFound):
        sessions.get(conn, pk)
    assert records.usage(conn, agent["repository_id"])["record_count"] == 1


def test_full_bitmap_sets_exactly_block_count_bits():
    assert sessions.full_bitmap(0) == b""
    assert sessions.full_bitmap(8) == b"\xff"
    assert sessions.full_bitmap(11) == b"\xff\x07"
