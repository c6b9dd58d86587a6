"""Unit tests of the push client's parts that need no server: the token bucket, the image
reader, the local state of runs, the progress line."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from replicore import protocol
from replicore.source import identity
from replicore.source.progress import Counters, Display
from replicore.source.ratelimit import TokenBucket
from replicore.source.reader import Image, ImageError, hash_blocks
from replicore.source.state import AgentState, StateError
from replicore.source.transport import WireCounter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def test_token_bucket_never_exceeds_the_rate_plus_a_tenth_of_a_second() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, clock=clock, sleep=clock.sleep)
    start = clock.now
    sent = 0
    for _ in range(50):
        bucket.acquire(300)
        sent += 300
        # Whatever has been handed out by now fits in the elapsed time at the rate, plus
        # the bucket's capacity (a tenth of a second).
        assert sent <= (clock.now - start) * 1000.0 + bucket.capacity
    assert clock.now - start >= (sent - bucket.capacity) / 1000.0


def test_token_bucket_refills_while_idle_but_only_up_to_its_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, clock=clock, sleep=clock.sleep)
    clock.now += 60.0  # a long pause
    before = clock.slept
    bucket.acquire(100)  # within the 100-byte capacity: no wait
    assert clock.slept == before
    bucket.acquire(1000)  # the rest waits for the rate
    assert clock.slept - before == pytest.approx(1.0)


def test_token_bucket_pieces_stay_small_for_small_rates() -> None:
    assert TokenBucket(10_000.0).piece_size == 1024
    assert TokenBucket(1_000_000.0).piece_size == 100_000
    assert TokenBucket(10**10).piece_size == 256 * 1024


def test_image_reads_blocks_by_runs_and_the_short_last_block(tmp_path: Path) -> None:
    path = tmp_path / "img"
    data = os.urandom(5 * 4096 + 123)
    path.write_bytes(data)
    with Image(path, 4096) as image:
        assert (image.size, image.block_count) == (len(data), 6)
        assert image.block_length(5) == 123
        buffer, views = image.read_blocks([0, 1, 3, 5])
        assert [bytes(v) for v in views] == [
            data[0:4096],
            data[4096:8192],
            data[3 * 4096 : 4 * 4096],
            data[5 * 4096 :],
        ]
        again, views2 = image.read_blocks([2], buffer)
        assert again is buffer and bytes(views2[0]) == data[2 * 4096 : 3 * 4096]


def test_hash_blocks_matches_the_protocol_record_key() -> None:
    data = os.urandom(3 * 4096 + 7)
    keys = hash_blocks(memoryview(data), 4096)
    assert keys == [protocol.record_key(data[i : i + 4096]) for i in range(0, len(data), 4096)]


def test_image_that_shrank_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(8192))
    with Image(path, 4096) as image:
        os.truncate(path, 4096)
        with pytest.raises(ImageError, match="ended at byte 4096"):
            image.read_blocks([1])


def test_image_must_be_a_file_or_block_device(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="neither a file nor a block device"):
        Image(tmp_path, 4096)
    with pytest.raises(ImageError, match="cannot open"):
        Image(tmp_path / "absent", 4096)


@pytest.fixture
def source(tmp_path: Path) -> identity.Identity:
    return identity.init(tmp_path / "source")


def test_state_resumes_the_run_for_the_same_volumes_and_shapes(source) -> None:
    with AgentState.locked(source, "core-1", "web/01") as state:
        run, resumed, abandoned = state.start_run({"c": (100, 4096), "d": (200, 4096)})
        assert not resumed and not abandoned
        assert run["volumes"]["c"] == {
            "epoch": 1,
            "previousEpoch": None,
            "size": 100,
            "blockSize": 4096,
            "sessionId": None,
            "committed": False,
        }
        state.set_session("c", "s-c")
        state.volume_committed("c", 1)
        state.set_session("d", "s-d")
    with AgentState.locked(source, "core-1", "web/01") as state:
        again, resumed, _ = state.start_run({"d": (200, 4096), "c": (999, 4096)})
        # c is committed in that run, so its new size does not matter. The resumed attempt
        # is a new job on the target, of the same recovery point.
        assert resumed and again["jobId"] != run["jobId"]
        assert again["recoveryPointId"] == run["recoveryPointId"]
        state.volume_committed("d", 1)
        state.finish_run()
    with AgentState.locked(source, "core-1", "web/01") as state:
        nxt, resumed, _ = state.start_run({"c": (100, 4096)})
        assert not resumed and nxt["volumes"]["c"]["epoch"] == 2
        assert nxt["volumes"]["c"]["previousEpoch"] == 1


def test_state_abandons_an_interrupted_run_for_other_volumes(source) -> None:
    with AgentState.locked(source, "core-1", "web01") as state:
        run, _, _ = state.start_run({"c": (100, 4096)})
        state.set_session("c", "s-c")
    with AgentState.locked(source, "core-1", "web01") as state:
        new, resumed, abandoned = state.start_run({"c": (100, 4096), "d": (5, 4096)})
        assert not resumed and new["jobId"] != run["jobId"]
        assert abandoned == [{"driverVolumeId": "c", "jobId": run["jobId"], "sessionId": "s-c"}]


def test_state_refuses_a_second_push_of_the_same_agent_at_once(source) -> None:
    with (
        AgentState.locked(source, "core-1", "web01"),
        pytest.raises(StateError, match="another push"),
        AgentState.locked(source, "core-1", "web01"),
    ):
        pass


def test_corrupt_state_is_a_clear_error(source) -> None:
    with AgentState.locked(source, "core-1", "web01") as state:
        path = state.path
    path.write_text("{not json")
    with (
        pytest.raises(StateError, match="not valid JSON"),
        AgentState.locked(source, "core-1", "web01"),
    ):
        pass


def test_progress_line_names_read_sent_deduplicated_rate_and_eta() -> None:
    counters = Counters(total_bytes=100 * 1024 * 1024)
    counters.add(bytes_read=50 * 1024 * 1024, missing_bytes=10 * 1024 * 1024)
    counters.add(raw_bytes_sent=5 * 1024 * 1024, bytes_sent=2 * 1024 * 1024, records_sent=80)
    wire = WireCounter()
    wire.add(sent=3 * 1024 * 1024)
    out = io.StringIO()
    line = Display(counters, wire, out).line()
    assert "read 50.0 MiB of 100.0 MiB" in line
    assert "sent 5.0 MiB (2.0 MiB compressed, 80 records)" in line
    assert "deduplicated 40.0 MiB" in line
    assert "MiB/s" in line and "ETA" in line
