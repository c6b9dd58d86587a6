"""The push's hash pass (`source.hashpass`): the key list of an image, in order, bounded ahead
of its taker, stoppable, and failing loudly when the image changes under it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from replicore import protocol
from replicore.source import hashpass
from replicore.source.hashpass import Cancelled, HashPass
from replicore.source.reader import Image, ImageError

BS = 4096


def expected_keys(data: bytes) -> list[tuple[int, bytes, int]]:
    return [
        (i, protocol.record_key(data[i * BS : (i + 1) * BS]), len(data[i * BS : (i + 1) * BS]))
        for i in range(-(-len(data) // BS))
    ]


def take_all(hash_pass: HashPass) -> list[tuple[int, bytes, int]]:
    entries = []
    while (batch := hash_pass.take()) is not None:
        entries += [(e.index, e.key, e.length) for e in batch]
    return entries


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashpass, "KEYS_BATCH_BYTES", 16 * BS)
    monkeypatch.setattr(hashpass, "MIN_KEYS_BATCH", 16)
    monkeypatch.setattr(hashpass, "READ_CHUNK", 8 * BS)


def test_the_key_list_is_every_block_in_order_with_its_checksum(tmp_path: Path, small_batches):
    data = os.urandom(100 * BS + 123)  # a short last block
    (tmp_path / "img").write_bytes(data)
    with Image(tmp_path / "img", BS) as image:
        hash_pass = HashPass.started(image)
        entries = take_all(hash_pass)
        assert hash_pass.take() is None  # for every taker
    assert entries == expected_keys(data)
    assert hash_pass.key_count == 101
    checksum = protocol.KeyListChecksum()
    for index, key, _ in entries:
        checksum.update(index, key)
    assert hash_pass.checksum.hexdigest() == checksum.hexdigest()


def test_the_pass_runs_ahead_of_a_slow_taker_up_to_its_bound(
    tmp_path: Path, small_batches, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(hashpass, "KEYS_AHEAD_BYTES", 64 * BS)
    data = os.urandom(256 * BS)
    (tmp_path / "img").write_bytes(data)
    with Image(tmp_path / "img", BS) as image:
        hash_pass = HashPass.started(image)
        deadline = time.monotonic() + 10
        while hash_pass.queued < 48 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hash_pass.queued >= 48  # more than two batches wait...
        time.sleep(0.2)
        assert hash_pass.queued <= 64  # ...but never more blocks than the bound
        assert take_all(hash_pass) == expected_keys(data)


def test_reads_are_reported_including_those_before_the_report_was_asked(
    tmp_path: Path, small_batches
):
    (tmp_path / "img").write_bytes(os.urandom(40 * BS))
    with Image(tmp_path / "img", BS) as image:
        hash_pass = HashPass.started(image)
        deadline = time.monotonic() + 10
        while hash_pass.bytes_read < 8 * BS and time.monotonic() < deadline:
            time.sleep(0.01)
        reported: list[int] = []
        hash_pass.report_reads(reported.append)
        take_all(hash_pass)
    assert sum(reported) == 40 * BS


def test_cancel_stops_the_pass_and_raises_to_a_waiting_taker(
    tmp_path: Path, small_batches, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(hashpass, "KEYS_AHEAD_BYTES", 16 * BS)
    (tmp_path / "img").write_bytes(os.urandom(256 * BS))
    with Image(tmp_path / "img", BS) as image:
        hash_pass = HashPass.started(image)
        first = hash_pass.take()  # the pass now waits for room: nobody takes again
        assert first is not None
        hash_pass.cancel()  # returns: the thread ended
        assert hash_pass.bytes_read < 256 * BS
        with pytest.raises(Cancelled):
            while hash_pass.take() is not None:
                pass


def test_an_image_that_shrinks_fails_the_pass_for_its_taker(tmp_path: Path, small_batches):
    path = tmp_path / "img"
    path.write_bytes(os.urandom(64 * BS))
    with Image(path, BS) as image:
        os.truncate(path, 20 * BS)
        hash_pass = HashPass.started(image)
        with pytest.raises(ImageError, match="ended at byte"):
            take_all(hash_pass)
        hash_pass.cancel()


def test_a_taker_waiting_on_another_thread_is_woken_by_the_end(tmp_path: Path):
    (tmp_path / "img").write_bytes(os.urandom(3 * BS))
    with Image(tmp_path / "img", BS) as image:
        hash_pass = HashPass(image)
        got: list[object] = []
        takers = [
            threading.Thread(target=lambda: got.append(take_all(hash_pass))) for _ in range(2)
        ]
        for taker in takers:
            taker.start()
        hash_pass.start()
        for taker in takers:
            taker.join(10)
    assert sorted(len(g) for g in got) == [0, 3]  # type: ignore[arg-type]
