"""Target-side retention: which recovery points of an agent to keep, and rolling up the rest.

Owns `retention_policies`: one default row (`agent_pk` NULL) and per-agent overrides set by
the operator. A policy keeps every recovery point newer than `keep_all_seconds`; of the older
ones it keeps the newest point of each of the `hourly` most recent UTC hours that have one,
likewise for `daily` days, `weekly` ISO weeks and `monthly` months (a point may be kept by
several rules). Without any row, or with `enabled = 0`, everything is kept: retention only
deletes what an operator asked it to.

Some points are never deleted whatever the policy says: incomplete ones (still arriving),
those holding the newest epoch of a volume (the source's next incremental builds on it),
those holding an epoch an open session builds on, and those whose removal would fold blocks
across repositories (an agent moved between repositories mid-chain).

Deleting a recovery point rolls up its images, one transaction per recovery point
(`delete_recovery_point`): for each image D and each child C (the images whose
`previous_epoch_number` is D's epoch), the blocks of D that C does not hold itself and that
lie inside C are copied into C's block map, C then builds on D's parent (or becomes a base
image if D was one), and D goes. Every remaining image reads back exactly as before. The
records D alone referenced are left for garbage collection (`store/gc.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import apsw

from ..errors import Conflict, Unprocessable
from . import images
from .db import row, rows

SCHEMA = """
CREATE TABLE retention_policies (
    id               INTEGER PRIMARY KEY,
    agent_pk         INTEGER UNIQUE REFERENCES agents(id) ON DELETE CASCADE,
    enabled          INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    keep_all_seconds REAL NOT NULL CHECK (keep_all_seconds >= 0),
    hourly           INTEGER NOT NULL CHECK (hourly >= 0),
    daily            INTEGER NOT NULL CHECK (daily >= 0),
    weekly           INTEGER NOT NULL CHECK (weekly >= 0),
    monthly          INTEGER NOT NULL CHECK (monthly >= 0),
    updated_at       REAL NOT NULL,
    updated_by       TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE UNIQUE INDEX retention_policies_one_default ON retention_policies((agent_pk IS NULL))
    WHERE agent_pk IS NULL;
"""

#: Largest count per granularity (ten years of hours).
MAX_COUNT = 87_600


@dataclass(frozen=True)
class Policy:
    """A retention policy; `enabled=False` keeps everything."""

    enabled: bool = False
    keep_all_seconds: float = 0.0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "keepAllSeconds": self.keep_all_seconds,
            "hourly": self.hourly,
            "daily": self.daily,
            "weekly": self.weekly,
            "monthly": self.monthly,
        }


KEEP_EVERYTHING = Policy()


def check_policy(policy: Policy) -> Policy:
    if policy.keep_all_seconds < 0:
        raise Unprocessable("the keep-all window must not be negative", field="keepAll")
    for name in ("hourly", "daily", "weekly", "monthly"):
        value = getattr(policy, name)
        if not 0 <= value <= MAX_COUNT:
            raise Unprocessable(f"{name} must be 0..{MAX_COUNT}", field=name)
    return policy


def _policy(found: dict[str, Any]) -> Policy:
    return Policy(
        enabled=bool(found["enabled"]),
        keep_all_seconds=float(found["keep_all_seconds"]),
        hourly=int(found["hourly"]),
        daily=int(found["daily"]),
        weekly=int(found["weekly"]),
        monthly=int(found["monthly"]),
    )


def default_policy(conn: apsw.Connection) -> Policy:
    found = row(conn, "SELECT * FROM retention_policies WHERE agent_pk IS NULL")
    return _policy(found) if found else KEEP_EVERYTHING


def agent_override(conn: apsw.Connection, agent_pk: int) -> Policy | None:
    found = row(conn, "SELECT * FROM retention_policies WHERE agent_pk = ?", (agent_pk,))
    return _policy(found) if found else None


def effective_policy(conn: apsw.Connection, agent_pk: int) -> tuple[Policy, str]:
    """The agent's policy and where it comes from ('agent' or 'default')."""
    own = agent_override(conn, agent_pk)
    if own is not None:
        return own, "agent"
    return default_policy(conn), "default"


def set_policy(
    conn: apsw.Connection, agent_pk: int | None, policy: Policy, now: float, by: str = ""
) -> None:
    """Set the default policy (agent_pk None) or an agent's override."""
    check_policy(policy)
    values = (
        int(policy.enabled),
        policy.keep_all_seconds,
        policy.hourly,
        policy.daily,
        policy.weekly,
        policy.monthly,
        now,
        by,
    )
    if agent_pk is None:
        conn.execute("DELETE FROM retention_policies WHERE agent_pk IS NULL")
    else:
        conn.execute("DELETE FROM retention_policies WHERE agent_pk = ?", (agent_pk,))
    conn.execute(
        "INSERT INTO retention_policies(agent_pk, enabled, keep_all_seconds, hourly, daily,"
        " weekly, monthly, updated_at, updated_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (agent_pk, *values),
    )


def clear_override(conn: apsw.Connection, agent_pk: int) -> bool:
    """Drop the agent's override (it follows the default again); True if it had one."""
    conn.execute("DELETE FROM retention_policies WHERE agent_pk = ?", (agent_pk,))
    return conn.changes() > 0


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------


def parse_timestamp(text: str) -> datetime:
    """A stored recovery point timestamp (UTC, `...Z`) as an aware datetime."""
    moment = datetime.fromisoformat(text.removesuffix("Z"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def iso(moment: datetime) -> str:
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _hour(m: datetime) -> tuple[datetime, datetime]:
    start = m.replace(minute=0, second=0, microsecond=0)
    return start, start + timedelta(hours=1)


def _day(m: datetime) -> tuple[datetime, datetime]:
    start = m.replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


def _week(m: datetime) -> tuple[datetime, datetime]:
    day, _ = _day(m)
    start = day - timedelta(days=day.isoweekday() - 1)
    return start, start + timedelta(days=7)


def _month(m: datetime) -> tuple[datetime, datetime]:
    start = m.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (start + timedelta(days=32)).replace(day=1)
    return start, following


#: Granularities, finest first: name, the policy's count attribute, the cell of a moment.
GRANULARITIES: list[tuple[str, Callable[[datetime], tuple[datetime, datetime]]]] = [
    ("hourly", _hour),
    ("daily", _day),
    ("weekly", _week),
    ("monthly", _month),
]


@dataclass
class Point:
    """A recovery point as the planner sees it."""

    pk: int
    recovery_point_id: str
    moment: datetime
    complete: bool = True
    #: Why it must stay whatever the policy says ('' when nothing forbids deleting it).
    pinned: str = ""


@dataclass
class Decision:
    keep: bool
    reasons: list[str] = field(default_factory=list)
    #: (lowerBound, upperBound, isAdHoc): the retention cell the point stands for.
    cell: tuple[datetime, datetime, bool] | None = None


def plan(points: Iterable[Point], policy: Policy, now: datetime) -> dict[int, Decision]:
    """Decide, for each point, keep or delete under `policy` at `now` (see module docstring).
    Pure: no database."""
    ordered = sorted(points, key=lambda p: (p.moment, p.pk), reverse=True)
    decisions = {p.pk: Decision(keep=False) for p in ordered}
    window_start = now - timedelta(seconds=policy.keep_all_seconds)
    older: list[Point] = []
    for point in ordered:
        decision = decisions[point.pk]
        if not policy.enabled:
            decision.keep = True
            decision.reasons.append("no retention policy")
        elif not point.complete:
            decision.keep = True
            decision.reasons.append("incomplete")
        elif point.moment > window_start:
            decision.keep = True
            decision.reasons.append("recent")
        else:
            older.append(point)
        if point.pinned:
            decision.keep = True
            decision.reasons.append(point.pinned)
    if policy.enabled:
        for name, cell_of in GRANULARITIES:
            wanted = getattr(policy, name)
            seen: set[datetime] = set()
            for point in older:
                if len(seen) >= wanted:
                    break
                lower, upper = cell_of(point.moment)
                if lower in seen:
                    continue
                seen.add(lower)
                decision = decisions[point.pk]
                decision.keep = True
                decision.reasons.append(name)
                if decision.cell is None:
                    decision.cell = (lower, upper, False)
    finest = next((cell for name, cell in GRANULARITIES if getattr(policy, name)), _hour)
    for point in ordered:
        decision = decisions[point.pk]
        if decision.cell is not None:
            continue
        if decision.keep:
            decision.cell = (point.moment, point.moment, True)
        else:
            lower, upper = finest(point.moment)
            decision.cell = (lower, upper, False)
    return decisions


def _pins(conn: apsw.Connection, agent_pk: int) -> dict[int, str]:
    """Recovery point pk -> why it must stay (newest epoch of a volume, parent of an open
    session, or a child in another repository)."""
    pins: dict[int, str] = {}
    for found in rows(
        conn,
        "SELECT vi.recovery_point_pk AS pk, vi.driver_volume_id AS volume FROM volume_images vi"
        " WHERE vi.agent_pk = ? AND vi.epoch_number = (SELECT max(epoch_number)"
        " FROM volume_images x WHERE x.agent_pk = vi.agent_pk"
        " AND x.driver_volume_id = vi.driver_volume_id)",
        (agent_pk,),
    ):
        pins.setdefault(found["pk"], f"newest image of volume {found['volume']}")
    for found in rows(
        conn,
        "SELECT vi.recovery_point_pk AS pk, s.session_id FROM sessions s JOIN volume_images vi"
        " ON vi.agent_pk = s.agent_pk AND vi.driver_volume_id = s.driver_volume_id"
        " AND vi.epoch_number = s.previous_epoch_number WHERE s.agent_pk = ?",
        (agent_pk,),
    ):
        pins.setdefault(found["pk"], f"an open session ({found['session_id']}) builds on it")
    for found in rows(
        conn,
        "SELECT p.recovery_point_pk AS pk FROM volume_images p JOIN volume_images c"
        " ON c.agent_pk = p.agent_pk AND c.driver_volume_id = p.driver_volume_id"
        " AND c.previous_epoch_number = p.epoch_number"
        " WHERE p.agent_pk = ? AND c.repository_id != p.repository_id",
        (agent_pk,),
    ):
        pins.setdefault(found["pk"], "a later image of its volume is in another repository")
    return pins


def points_of(conn: apsw.Connection, agent_pk: int) -> list[Point]:
    pins = _pins(conn, agent_pk)
    return [
        Point(
            pk=r["id"],
            recovery_point_id=r["recovery_point_id"],
            moment=parse_timestamp(r["timestamp"]),
            complete=bool(r["complete"]),
            pinned=pins.get(r["id"], ""),
        )
        for r in rows(
            conn,
            "SELECT id, recovery_point_id, timestamp, complete FROM recovery_points"
            " WHERE agent_pk = ?",
            (agent_pk,),
        )
    ]


def agent_plan(
    conn: apsw.Connection, agent_pk: int, now: datetime, policy: Policy | None = None
) -> tuple[list[Point], dict[int, Decision], Policy]:
    """The agent's points, newest first, and what its policy (or `policy`) decides now."""
    chosen = policy if policy is not None else effective_policy(conn, agent_pk)[0]
    points = sorted(points_of(conn, agent_pk), key=lambda p: (p.moment, p.pk), reverse=True)
    return points, plan(points, chosen, now), chosen


# --------------------------------------------------------------------------
# Rolling up
# --------------------------------------------------------------------------


def _children(conn: apsw.Connection, image: dict[str, Any]) -> list[dict[str, Any]]:
    return rows(
        conn,
        "SELECT * FROM volume_images WHERE agent_pk = ? AND driver_volume_id = ?"
        " AND previous_epoch_number = ?",
        (image["agent_pk"], image["driver_volume_id"], image["epoch_number"]),
    )


def remove_image(conn: apsw.Connection, image: dict[str, Any]) -> int:
    """Delete one volume image, folding its blocks into its children first (see module
    docstring); returns how many block entries were folded. Runs in the caller's
    transaction."""
    folded = 0
    for child in _children(conn, image):
        if child["repository_id"] != image["repository_id"]:
            raise Conflict(
                f"volume image {images.name(child)} is in another repository than"
                f" {images.name(image)}, which it builds on; it cannot be rolled up"
            )
        conn.execute(
            "INSERT INTO image_blocks(image_id, block_index, key)"
            " SELECT ?, d.block_index, d.key FROM image_blocks d"
            " WHERE d.image_id = ? AND d.block_index < ? AND NOT EXISTS"
            " (SELECT 1 FROM image_blocks c"
            " WHERE c.image_id = ? AND c.block_index = d.block_index)",
            (child["id"], image["id"], child["block_count"], child["id"]),
        )
        folded += conn.changes()
        conn.execute(
            "UPDATE volume_images SET previous_epoch_number = ?, stored_block_count ="
            " (SELECT count(*) FROM image_blocks WHERE image_id = ?) WHERE id = ?",
            (image["previous_epoch_number"], child["id"], child["id"]),
        )
    conn.execute("DELETE FROM image_blocks WHERE image_id = ?", (image["id"],))
    conn.execute("DELETE FROM volume_images WHERE id = ?", (image["id"],))
    return folded


def delete_recovery_point(conn: apsw.Connection, recovery_point_pk: int) -> dict[str, Any]:
    """Roll up and delete one recovery point with all its images, in the caller's one
    transaction. Returns what was removed."""
    point = row(conn, "SELECT * FROM recovery_points WHERE id = ?", (recovery_point_pk,))
    if point is None:
        raise Conflict(f"recovery point {recovery_point_pk} is gone")
    removed = []
    folded = 0
    for image in images.recovery_point_images(conn, recovery_point_pk):
        folded += remove_image(conn, image)
        removed.append(images.name(image))
    conn.execute("DELETE FROM recovery_points WHERE id = ?", (recovery_point_pk,))
    return {
        "recoveryPointId": point["recovery_point_id"],
        "timestamp": point["timestamp"],
        "volumeImages": removed,
        "foldedBlocks": folded,
    }


def delete_if_still_planned(
    conn: apsw.Connection, agent_pk: int, recovery_point_pk: int, now: datetime
) -> dict[str, Any] | None:
    """Delete the point if the agent's policy still says so at `now` (the plan is made
    again inside this transaction, so a push or a session opened since is respected)."""
    _, decisions, _ = agent_plan(conn, agent_pk, now)
    decision = decisions.get(recovery_point_pk)
    if decision is None or decision.keep:
        return None
    return delete_recovery_point(conn, recovery_point_pk)


def agents_with_policies(conn: apsw.Connection) -> list[int]:
    """Agents whose effective policy is enabled and which have recovery points."""
    default_on = default_policy(conn).enabled
    found = rows(
        conn,
        "SELECT a.id, p.enabled FROM agents a LEFT JOIN retention_policies p ON p.agent_pk = a.id"
        " WHERE EXISTS (SELECT 1 FROM recovery_points r WHERE r.agent_pk = a.id) ORDER BY a.id",
    )
    return [r["id"] for r in found if (r["enabled"] == 1) or (r["enabled"] is None and default_on)]


def apply_sync(
    conn: apsw.Connection,
    agent_pks: list[int],
    now: datetime,
    *,
    dry_run: bool = False,
) -> list[dict[str, Any]]:
    """Apply retention to the agents on a connection outside any transaction (the CLI):
    each deletion in its own transaction. Returns the deletions (or planned ones)."""
    from .db import transaction

    done: list[dict[str, Any]] = []
    for agent_pk in agent_pks:
        points, decisions, _ = agent_plan(conn, agent_pk, now)
        for point in points:
            if decisions[point.pk].keep:
                continue
            if dry_run:
                done.append(
                    {
                        "agentPk": agent_pk,
                        "recoveryPointId": point.recovery_point_id,
                        "timestamp": iso(point.moment),
                        "planned": True,
                    }
                )
                continue
            with transaction(conn):
                result = delete_if_still_planned(conn, agent_pk, point.pk, now)
            if result is not None:
                done.append({"agentPk": agent_pk, **result})
    return done


def utc_now() -> datetime:
    return datetime.fromtimestamp(time.time(), UTC)
