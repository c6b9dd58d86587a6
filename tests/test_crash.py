"""Crash consistency in CI: a handful of SIGKILL points at random moments of pushes, commits,
agent deletions, garbage collection and seed-drive consumption (tests/crash_helpers.py).
After each: `PRAGMA integrity_check` is ok, `replicore verify` is clean, the interrupted work
completes, and every image exports bit for bit. The long run (>= 50 kill points) is
tests/long/crash_harness.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from crash_helpers import Harness

ADMIN = ("admin", "correct horse battery")


def harness_for(make_server, tmp_path: Path, session_timeout: float, seed: int) -> Harness:
    server = make_server(f"[replication]\nsession_timeout = {session_timeout}\n")
    assert server.cli("admin", "add", ADMIN[0], "--password-stdin", stdin=ADMIN[1]).status == 0
    return Harness(server, tmp_path / "harness", ADMIN, seed=seed, image_mib=8, log=print)


@pytest.mark.parametrize(
    ("kinds", "session_timeout"),
    [
        (["push", "push", "push"], 30.0),
        (["commit", "commit"], 30.0),
        (["delete", "delete"], 30.0),
        (["gc"], 2.0),
        (["seed"], 30.0),
    ],
    ids=["push", "commit", "delete", "gc", "seed"],
)
def test_sigkill_leaves_a_sound_database_and_the_work_completes_exactly(
    make_server, tmp_path: Path, kinds: list[str], session_timeout: float
) -> None:
    harness = harness_for(make_server, tmp_path, session_timeout, seed=len(kinds))
    harness.setup(spare_agents=kinds.count("delete") + kinds.count("seed"), garbage_agents=1)
    points = harness.run(kinds)
    assert [p.ok for p in points] == [True] * len(kinds)
    harness.final_check()
