"""Retention without a server: the planner's decisions (pure), and rolling up incrementals so
that every image left reads back exactly, whatever is deleted and in whatever order."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from inventory_helpers import add_agent, add_source, read_back, store_push
from replicore.errors import Conflict
from replicore.store import db, images, retention
from replicore.store.db import transaction
from replicore.store.retention import Point, Policy, plan

NOW = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)


def points_every(hours: float, count: int, start: datetime = NOW) -> list[Point]:
    """`count` points, newest first, `hours` apart, the newest at `start`."""
    return [
        Point(
            pk=count - i,
            recovery_point_id=f"rp{count - i}",
            moment=start - timedelta(hours=hours * i),
        )
        for i in range(count)
    ]


def kept(decisions: dict[int, retention.Decision]) -> set[int]:
    return {pk for pk, d in decisions.items() if d.keep}


def test_without_a_policy_everything_is_kept():
    points = points_every(1, 30)
    decisions = plan(points, retention.KEEP_EVERYTHING, NOW)
    assert kept(decisions) == {p.pk for p in points}
    assert all(d.cell is not None and d.cell[2] for d in decisions.values())


def test_keep_all_window_then_newest_of_each_day():
    points = points_every(6, 40)  # 10 days, 4 points a day at 12:30, 06:30, 00:30, 18:30
    policy = Policy(enabled=True, keep_all_seconds=24 * 3600, daily=3)
    decisions = plan(points, policy, NOW)
    recent = {p.pk for p in points if p.moment > NOW - timedelta(days=1)}
    older = [p for p in points if p.pk not in recent]
    days: dict[Any, Point] = {}
    for point in older:  # newest first: the first seen of each day is its newest
        days.setdefault(point.moment.date(), point)
    daily = {days[d].pk for d in sorted(days, reverse=True)[:3]}
    assert kept(decisions) == recent | daily
    for pk in daily:
        lower, upper, ad_hoc = decisions[pk].cell  # type: ignore[misc]
        assert not ad_hoc and upper - lower == timedelta(days=1)
        assert decisions[pk].reasons == ["daily"]


def test_granularities_add_up_and_a_point_may_serve_several():
    points = points_every(1, 24 * 20)
    policy = Policy(enabled=True, hourly=5, daily=4, weekly=2, monthly=1)
    decisions = plan(points, policy, NOW)
    first = decisions[points[0].pk]
    assert first.keep and first.reasons == ["hourly", "daily", "weekly", "monthly"]
    assert len(kept(decisions)) == 5 + 3 + 1  # day/week/month of the newest are shared


def test_pinned_and_incomplete_points_stay_whatever_the_policy():
    points = points_every(24, 10)
    points[-1].pinned = "newest image of volume c"
    points[-2].complete = False
    decisions = plan(points, Policy(enabled=True, keep_all_seconds=0), NOW)
    assert kept(decisions) == {points[-1].pk, points[-2].pk}
    assert decisions[points[-2].pk].reasons == ["incomplete"]


# --------------------------------------------------------------------------
# Rolling up in the store
# --------------------------------------------------------------------------

BS = 64


def _chain(conn: Any, agent: dict[str, Any], rng: random.Random, count: int) -> dict[int, bytes]:
    """Push `count` epochs of volume c: size changes now and then (every block announced),
    otherwise a few changed blocks (only those announced, as a change-tracking source)."""
    pushed: dict[int, bytes] = {}
    image = rng.randbytes(20 * BS + 17)
    for epoch in range(1, count + 1):
        previous = epoch - 1 if epoch > 1 else None
        only = None
        if epoch > 1 and rng.random() < 0.25:
            size = max(BS, len(image) + rng.choice([-3, -1, 1, 2]) * BS + rng.randrange(-20, 20))
            image = (image + rng.randbytes(max(0, size - len(image))))[:size]
        elif epoch > 1:
            data = bytearray(image)
            count_blocks = -(-len(image) // BS)
            only = sorted(rng.sample(range(count_blocks), k=min(3, count_blocks)))
            for index in only:
                end = min(len(data), (index + 1) * BS)
                data[index * BS : end] = rng.randbytes(end - index * BS)
            image = bytes(data)
        store_push(conn, agent, "c", epoch, image, BS, previous=previous, only=only)
        pushed[epoch] = image
    return pushed


@pytest.mark.parametrize("seed", range(6))
def test_rolling_up_any_points_keeps_every_other_image_exact(conn, seed):
    rng = random.Random(seed)
    agent = add_agent(conn, add_source(conn, "core-a"), "web01")
    pushed = _chain(conn, agent, rng, 12)
    doomed = rng.sample(range(1, 12), k=rng.randrange(1, 11))  # never the newest epoch
    for epoch in doomed:
        image = images.find(conn, agent["id"], "c", epoch)
        assert image is not None
        with transaction(conn):
            retention.delete_recovery_point(conn, image["recovery_point_pk"])
    left = sorted(set(pushed) - set(doomed))
    for epoch in left:
        assert read_back(conn, agent["id"], "c", epoch) == pushed[epoch], epoch
        image = images.find(conn, agent["id"], "c", epoch)
        assert image is not None
        previous = [e for e in left if e < epoch]
        assert image["previous_epoch_number"] == (previous[-1] if previous else None)
    assert db.row(conn, "SELECT count(*) AS n FROM recovery_points")["n"] == len(left)  # type: ignore[index]


def test_deleting_the_base_makes_the_child_a_base(conn):
    agent = add_agent(conn, add_source(conn, "core-a"), "web01")
    pushed = _chain(conn, agent, random.Random(99), 3)
    base = images.find(conn, agent["id"], "c", 1)
    assert base is not None
    with transaction(conn):
        done = retention.delete_recovery_point(conn, base["recovery_point_pk"])
    assert done["volumeImages"] == ["c:1"]
    child = images.find(conn, agent["id"], "c", 2)
    assert child is not None and child["previous_epoch_number"] is None
    assert child["stored_block_count"] == child["block_count"]
    assert read_back(conn, agent["id"], "c", 2) == pushed[2]
    assert read_back(conn, agent["id"], "c", 3) == pushed[3]


def test_a_chain_crossing_repositories_is_not_rolled_up(conn):
    core = add_source(conn, "core-a")
    agent = add_agent(conn, core, "web01", repository="one")
    image = random.Random(5).randbytes(8 * BS)
    store_push(conn, agent, "c", 1, image, BS)
    with transaction(conn):
        other = db.row(conn, "SELECT id FROM repositories WHERE name = 'one'")
        conn.execute("INSERT INTO repositories(name, created_at) VALUES ('two', 0)")
        conn.execute(
            "UPDATE agents SET repository_id = ? WHERE id = ?",
            (conn.last_insert_rowid(), agent["id"]),
        )
    assert other is not None
    moved = db.row(conn, "SELECT * FROM agents WHERE id = ?", (agent["id"],))
    store_push(conn, moved, "c", 2, image, BS, previous=1)
    first = images.find(conn, agent["id"], "c", 1)
    assert first is not None
    _, decisions, _ = retention.agent_plan(
        conn, agent["id"], NOW + timedelta(days=400), Policy(enabled=True)
    )
    assert decisions[first["recovery_point_pk"]].keep
    assert "another repository" in decisions[first["recovery_point_pk"]].reasons[0]
    with pytest.raises(Conflict), transaction(conn):
        retention.delete_recovery_point(conn, first["recovery_point_pk"])
    assert read_back(conn, agent["id"], "c", 2) == image


def test_a_point_an_open_session_builds_on_is_kept(conn):
    agent = add_agent(conn, add_source(conn, "core-a"), "web01")
    pushed = _chain(conn, agent, random.Random(3), 3)
    store_push(conn, agent, "c", 5, pushed[3], BS, previous=3, commit=False)
    store_push(conn, agent, "d", 1, pushed[3], BS, timestamp="2026-11-28T10:00:00Z")
    _, decisions, _ = retention.agent_plan(
        conn, agent["id"], NOW + timedelta(days=400), Policy(enabled=True)
    )
    by_id = {
        p["recovery_point_id"]: p["id"]
        for p in db.rows(conn, "SELECT id, recovery_point_id FROM recovery_points")
    }
    assert not decisions[by_id["rp-c-1"]].keep and not decisions[by_id["rp-c-2"]].keep
    assert decisions[by_id["rp-c-3"]].keep  # the newest of c, and the open session's parent
    assert decisions[by_id["rp-d-1"]].keep
