"""Retention over a real server: a policy applied to 50 recovery points keeps the expected
ones and every kept one exports exactly; the daemon applies the default policy by itself."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from datapath_helpers import KIB, DataPathClient, make_image, mutate
from inventory_helpers import add_admin, export, wait_for
from pairing_helpers import pair_by_demand

BS = 16 * KIB
COUNT = 50
AT = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def push_series(
    client: Any, agent: str, count: int, newest: datetime, every: timedelta
) -> dict[str, tuple[datetime, bytes]]:
    """`count` recovery points of volume c, oldest first, `every` apart up to `newest`;
    each an incremental announcing only its one changed block. id -> (time, image)."""
    push = DataPathClient(client, agent)
    image = make_image(7, 128 * KIB, BS)
    pushed: dict[str, tuple[datetime, bytes]] = {}
    for epoch in range(1, count + 1):
        moment = newest - every * (count - epoch)
        if epoch > 1:
            image = mutate(image, BS, [epoch % 8], seed=epoch)
        push.push(
            "c",
            epoch,
            image,
            BS,
            epoch - 1 if epoch > 1 else None,
            [epoch % 8] if epoch > 1 else None,
            recovery_point=f"rp{epoch:02d}",
            timestamp=iso(moment),
        )
        pushed[f"rp{epoch:02d}"] = (moment, image)
    return pushed


def expected_kept(pushed: dict[str, tuple[datetime, bytes]], now: datetime) -> set[str]:
    """Keep all of the last day; then the newest of each of the 4 next days that have one,
    and the newest of each of the 2 most recent ISO weeks among those older points."""
    newest_first = sorted(pushed, key=lambda rp: pushed[rp][0], reverse=True)
    recent = {rp for rp in newest_first if pushed[rp][0] > now - timedelta(days=1)}
    older = [rp for rp in newest_first if rp not in recent]
    by_day: dict[Any, str] = {}
    by_week: dict[Any, str] = {}
    for rp in older:
        by_day.setdefault(pushed[rp][0].date(), rp)
        by_week.setdefault(pushed[rp][0].isocalendar()[:2], rp)
    days = [by_day[d] for d in sorted(by_day, reverse=True)[:4]]
    weeks = [by_week[w] for w in sorted(by_week, reverse=True)[:2]]
    return recent | set(days) | set(weeks)


def test_retention_of_50_points_keeps_the_expected_ones_and_each_exports_exactly(
    server, make_source, admin, tmp_path
):
    source = make_source("a")
    pair_by_demand(server, source, ["web01"], admin)
    with server.client(source) as client:
        pushed = push_series(client, "web01", COUNT, AT - timedelta(minutes=30), timedelta(hours=6))
    want = expected_kept(pushed, AT)
    assert 8 <= len(want) < 15  # the policy has real work to do
    policy = server.cli(
        "retention", "set", "--agent", "web01", "--keep-all", "1d", "--daily", "4", "--weekly", "2"
    )
    assert policy.status == 0, policy.stderr
    shown = server.cli("retention", "show", "--agent", "web01", "--at", AT.isoformat(), "--json")
    plan = json.loads(shown.stdout)
    assert plan["from"] == "agent" and plan["policy"]["daily"] == 4
    assert {p["id"] for p in plan["recoveryPoints"] if p["keep"]} == want
    dry = server.cli("retention", "apply", "--at", AT.isoformat(), "--dry-run")
    assert dry.stdout.count("would roll up") == COUNT - len(want)
    applied = server.cli("retention", "apply", "--agent", "web01", "--at", AT.isoformat())
    assert applied.status == 0, applied.stderr
    assert applied.stdout.count("rolled up recovery point") == COUNT - len(want)
    with server.client(source) as client:
        left = client.get("slave/agents/web01/rps").json()["recoveryPoints"]
        images = client.get("slave/agents/web01/replicatedVolumeImagesNew").json()["volumeImages"]
    assert {p["id"] for p in left} == want
    assert not any(i["isOrphaned"] for i in images)
    cells = {i["recoveryPointId"]: i["rollupGranularityCell"] for i in images}
    assert cells["rp50"]["isAdHoc"] and not cells[min(want)]["isAdHoc"]
    for rp in sorted(want):
        data = export(server, tmp_path, "--agent", "web01", "--volume", "c", "--recovery-point", rp)
        assert data == pushed[rp][1], rp
    again = server.cli("retention", "apply", "--agent", "web01", "--at", AT.isoformat())
    assert "nothing to roll up" in again.stdout


def test_the_daemon_applies_the_default_policy_by_itself(make_server, make_source, tmp_path):
    server = make_server("[recycle_bin]\nsweep_interval = 0.3\n")
    source = make_source("a")
    pair_by_demand(server, source, ["web01"], add_admin(server))
    now = datetime.now(UTC)
    with server.client(source) as client:
        pushed = push_series(client, "web01", 6, now - timedelta(days=3), timedelta(hours=1))
        shown = server.cli("retention", "show", "--json")
        assert json.loads(shown.stdout)["default"]["enabled"] is False
        assert server.cli("retention", "set", "--default", "--keep-all", "1d").status == 0

        def count() -> bool:
            return client.get("slave/agents/web01/rpsCount").json()["count"] == 1

        wait_for(count, timeout=20)
    # Only the newest stays: nothing is recent, and it holds the newest epoch of volume c.
    assert export(server, tmp_path, "--agent", "web01", "--volume", "c") == pushed["rp06"][1]
