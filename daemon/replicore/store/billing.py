"""Billing: the storage usage reports sources send (`PUT slave/storage`) and the monthly
report built from them and from what this target stores.

Owns `storage_reports` (one per PUT, with the time it arrived), `storage_report_agents` and
`storage_report_repositories` (the report's rows as the source sent them).

The monthly report, per source core (with its customer id) and agent:
- bytes protected as the source reported them, as a step function of time: each report holds
  until the next one, and an agent missing from a report had 0 bytes from then on. The
  average is weighted by time over the part of the month the reports cover (from the first
  report, or the month's start when an earlier report carries into it, to the month's end or
  now); the peak is the highest value in force during that part;
- bytes stored on this target (now, when the report is made): each record (stored,
  compressed size) referenced by the images of exactly one agent is that agent's unique
  bytes; a record several agents reference is shared out equally among them (integers,
  largest remainder, so the agents' bytes add up exactly to the referenced records' bytes);
  records no committed image references (open sessions, garbage) are left unattributed and
  shown per repository;
- recovery points: complete ones on this target now, and the count last reported.
"""

from __future__ import annotations

import calendar
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import apsw

from .db import row, rows

SCHEMA = """
CREATE TABLE storage_reports (
    id          INTEGER PRIMARY KEY,
    core_pk     INTEGER NOT NULL REFERENCES master_cores(id) ON DELETE CASCADE,
    received_at REAL NOT NULL
) STRICT;
CREATE INDEX storage_reports_core ON storage_reports(core_pk, received_at);
CREATE TABLE storage_report_agents (
    report_pk            INTEGER NOT NULL REFERENCES storage_reports(id) ON DELETE CASCADE,
    agent_id             TEXT NOT NULL,
    display_name         TEXT NOT NULL,
    host_name            TEXT NOT NULL,
    recovery_point_count INTEGER NOT NULL CHECK (recovery_point_count >= 0),
    oldest_rp_at         REAL,
    newest_rp_at         REAL,
    bytes_protected      INTEGER NOT NULL CHECK (bytes_protected >= 0),
    PRIMARY KEY (report_pk, agent_id)
) STRICT;
CREATE TABLE storage_report_repositories (
    report_pk     INTEGER NOT NULL REFERENCES storage_reports(id) ON DELETE CASCADE,
    repository_id TEXT NOT NULL,
    name          TEXT NOT NULL,
    bytes_used    INTEGER NOT NULL CHECK (bytes_used >= 0),
    bytes_free    INTEGER NOT NULL CHECK (bytes_free >= 0),
    PRIMARY KEY (report_pk, repository_id)
) STRICT;
"""


@dataclass(frozen=True)
class ReportedAgent:
    agent_id: str
    display_name: str
    host_name: str
    recovery_point_count: int
    oldest_rp_at: float | None
    newest_rp_at: float | None
    bytes_protected: int


@dataclass(frozen=True)
class ReportedRepository:
    repository_id: str
    name: str
    bytes_used: int
    bytes_free: int


def record_report(
    conn: apsw.Connection,
    core_pk: int,
    agents: list[ReportedAgent],
    repositories: list[ReportedRepository],
    now: float,
) -> int:
    """Store one usage report of a source as received at `now`; returns its id."""
    conn.execute("INSERT INTO storage_reports(core_pk, received_at) VALUES (?, ?)", (core_pk, now))
    report_pk = conn.last_insert_rowid()
    conn.executemany(
        "INSERT INTO storage_report_agents(report_pk, agent_id, display_name, host_name,"
        " recovery_point_count, oldest_rp_at, newest_rp_at, bytes_protected)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                report_pk,
                a.agent_id,
                a.display_name,
                a.host_name,
                a.recovery_point_count,
                a.oldest_rp_at,
                a.newest_rp_at,
                a.bytes_protected,
            )
            for a in agents
        ],
    )
    conn.executemany(
        "INSERT INTO storage_report_repositories(report_pk, repository_id, name, bytes_used,"
        " bytes_free) VALUES (?, ?, ?, ?, ?)",
        [(report_pk, r.repository_id, r.name, r.bytes_used, r.bytes_free) for r in repositories],
    )
    return report_pk


def latest_report(conn: apsw.Connection, core_pk: int) -> dict[str, Any] | None:
    """The source's newest report with its `agents` and `repositories` rows."""
    report = row(
        conn,
        "SELECT * FROM storage_reports WHERE core_pk = ? ORDER BY received_at DESC, id DESC"
        " LIMIT 1",
        (core_pk,),
    )
    if report is None:
        return None
    report["agents"] = rows(
        conn,
        "SELECT * FROM storage_report_agents WHERE report_pk = ? ORDER BY agent_id",
        (report["id"],),
    )
    report["repositories"] = rows(
        conn,
        "SELECT * FROM storage_report_repositories WHERE report_pk = ? ORDER BY repository_id",
        (report["id"],),
    )
    return report


# --- the monthly report --------------------------------------------------------------------


def month_bounds(month: str) -> tuple[float, float]:
    """'YYYY-MM' -> (start, end) in epoch seconds, UTC; ValueError if malformed."""
    year_text, sep, month_text = month.partition("-")
    if not sep or len(year_text) != 4 or len(month_text) != 2:
        raise ValueError(f"{month!r} is not YYYY-MM")
    year, number = int(year_text), int(month_text)
    if not 1 <= number <= 12:
        raise ValueError(f"{month!r} is not YYYY-MM")
    start = datetime(year, number, 1, tzinfo=UTC)
    days = calendar.monthrange(year, number)[1]
    end = start.timestamp() + days * 86400
    return start.timestamp(), end


def current_month(now: float | None = None) -> str:
    return datetime.fromtimestamp(now if now is not None else time.time(), UTC).strftime("%Y-%m")


def protected_over(
    samples: list[tuple[float, dict[str, int]]], start: float, end: float
) -> dict[str, dict[str, Any]]:
    """Time-weighted average, peak and last value of each agent's protected bytes over
    [start, end), from `samples` = [(time, {agent id: bytes})] in time order (the last sample
    at or before `start` included, so that its values carry into the window)."""
    result: dict[str, dict[str, Any]] = {}
    in_window = [s for s in samples if s[0] < end]
    if not in_window:
        return result
    covered_from = max(start, in_window[0][0])
    covered = end - covered_from
    agents = {agent for _, values in in_window for agent in values}
    for agent in agents:
        integral, peak, last, reports = 0.0, 0, 0, 0
        for i, (at, values) in enumerate(in_window):
            value = values.get(agent, 0)
            until = in_window[i + 1][0] if i + 1 < len(in_window) else end
            begin = max(at, covered_from)
            if until <= begin:
                continue  # superseded before the window opened
            integral += value * (until - begin)
            peak = max(peak, value)
            last = value
            if at >= start:
                reports += agent in values
        result[agent] = {
            "average": round(integral / covered) if covered > 0 else last,
            "peak": peak,
            "latest": last,
            "reports": reports,
        }
    return result


def _samples(
    conn: apsw.Connection, core_pk: int, start: float, end: float
) -> tuple[list[tuple[float, dict[str, int]]], dict[str, dict[str, Any]]]:
    """The core's reports that matter for [start, end) as samples, and the last reported row
    of each agent in them (names, recovery point count)."""
    carried = row(
        conn,
        "SELECT max(received_at) AS at FROM storage_reports WHERE core_pk = ? AND received_at <= ?",
        (core_pk, start),
    )
    since = carried["at"] if carried and carried["at"] is not None else start
    reports = rows(
        conn,
        "SELECT id, received_at FROM storage_reports WHERE core_pk = ? AND received_at >= ?"
        " AND received_at < ? ORDER BY received_at, id",
        (core_pk, since, end),
    )
    samples: list[tuple[float, dict[str, int]]] = []
    last_rows: dict[str, dict[str, Any]] = {}
    for report in reports:
        agent_rows = rows(
            conn, "SELECT * FROM storage_report_agents WHERE report_pk = ?", (report["id"],)
        )
        samples.append(
            (report["received_at"], {r["agent_id"]: r["bytes_protected"] for r in agent_rows})
        )
        for r in agent_rows:
            last_rows[r["agent_id"]] = r
    return samples, last_rows


_REFERENCES = """
WITH refs AS (
    SELECT DISTINCT vi.repository_id, ib.key, vi.agent_pk
    FROM image_blocks ib JOIN volume_images vi ON vi.id = ib.image_id
),
sharing AS (
    SELECT repository_id, key, count(*) AS agents FROM refs GROUP BY repository_id, key
)
SELECT refs.repository_id, refs.agent_pk, sharing.agents,
       count(*) AS records, sum(r.stored_length) AS bytes
FROM refs
JOIN sharing ON sharing.repository_id = refs.repository_id AND sharing.key = refs.key
JOIN records r ON r.repository_id = refs.repository_id AND r.key = refs.key
GROUP BY refs.repository_id, refs.agent_pk, sharing.agents
"""


def stored_bytes(
    conn: apsw.Connection,
) -> tuple[dict[int, dict[str, int]], dict[int, dict[str, int]]]:
    """What this target stores now. By agent row id: {"unique", "shared", "records"}; by
    repository id: {"stored" (all its records), "attributed" (referenced by some image)}."""
    per_agent: dict[int, dict[str, int]] = defaultdict(
        lambda: {"unique": 0, "shared": 0, "records": 0}
    )
    shares: dict[int, dict[int, Fraction]] = defaultdict(lambda: defaultdict(Fraction))
    attributed: dict[int, int] = defaultdict(int)
    for r in rows(conn, _REFERENCES):
        entry = per_agent[r["agent_pk"]]
        entry["records"] += r["records"]
        if r["agents"] == 1:
            entry["unique"] += r["bytes"]
            attributed[r["repository_id"]] += r["bytes"]
        else:
            shares[r["repository_id"]][r["agent_pk"]] += Fraction(r["bytes"], r["agents"])
    for repository_id, parts in shares.items():
        total = sum(parts.values(), Fraction(0))
        assert total.denominator == 1  # each shared record is split into whole parts
        floors = {agent: int(part) for agent, part in parts.items()}
        left = int(total) - sum(floors.values())
        by_remainder = sorted(parts, key=lambda a: (floors[a] - parts[a], a))
        for agent in by_remainder[:left]:
            floors[agent] += 1
        for agent, value in floors.items():
            per_agent[agent]["shared"] += value
        attributed[repository_id] += int(total)
    per_repository = {
        r["repository_id"]: {"stored": r["stored"], "attributed": attributed[r["repository_id"]]}
        for r in rows(conn, "SELECT repository_id, stored_bytes AS stored FROM record_usage")
    }
    return dict(per_agent), per_repository


def _recovery_points(conn: apsw.Connection) -> dict[int, int]:
    return {
        r["agent_pk"]: r["n"]
        for r in rows(
            conn,
            "SELECT agent_pk, count(*) AS n FROM recovery_points WHERE complete = 1"
            " GROUP BY agent_pk",
        )
    }


def report(conn: apsw.Connection, month: str, now: float) -> dict[str, Any]:
    """The billing report of `month` ('YYYY-MM'; ValueError if malformed or in the future):
    see the module docstring. Times are epoch seconds."""
    start, month_end = month_bounds(month)
    if start > now:
        raise ValueError(f"{month} has not begun")
    end = min(month_end, now)
    agents_now, per_repository = stored_bytes(conn)
    recovery_points = _recovery_points(conn)
    cores = rows(
        conn,
        "SELECT c.* FROM master_cores c WHERE EXISTS (SELECT 1 FROM agents a"
        " WHERE a.core_pk = c.id AND (a.state = 'approved' OR a.repository_id IS NOT NULL))"
        " OR EXISTS (SELECT 1 FROM storage_reports s WHERE s.core_pk = c.id AND"
        " s.received_at < ?) ORDER BY c.customer_id, c.host_name, c.core_id, c.id",
        (end,),
    )
    sources = []
    for core in cores:
        samples, reported_rows = _samples(conn, core["id"], start, end)
        protected = protected_over(samples, start, end)
        known = {
            a["agent_id"]: a
            for a in rows(
                conn,
                "SELECT * FROM agents WHERE core_pk = ?"
                " AND (state = 'approved' OR repository_id IS NOT NULL)",
                (core["id"],),
            )
        }
        agent_rows = []
        for agent_id in sorted(set(known) | set(protected)):
            agent = known.get(agent_id)
            reported = reported_rows.get(agent_id)
            held = agents_now.get(agent["id"], {}) if agent else {}
            seen = protected.get(agent_id)
            unique, shared = held.get("unique", 0), held.get("shared", 0)
            agent_rows.append(
                {
                    "agentId": agent_id,
                    "displayName": (agent or {}).get("display_name")
                    or (reported or {}).get("display_name", ""),
                    "hostName": (agent or {}).get("host_name")
                    or (reported or {}).get("host_name", ""),
                    "replicatedHere": agent is not None,
                    "protectedBytesAverage": seen["average"] if seen else None,
                    "protectedBytesPeak": seen["peak"] if seen else None,
                    "protectedBytesLatest": seen["latest"] if seen else None,
                    "reportsInMonth": seen["reports"] if seen else 0,
                    "storedUniqueBytes": unique,
                    "storedSharedBytes": shared,
                    "storedBytes": unique + shared,
                    "storedRecords": held.get("records", 0),
                    "recoveryPoints": recovery_points.get(agent["id"], 0) if agent else 0,
                    "reportedRecoveryPoints": reported["recovery_point_count"]
                    if reported
                    else None,
                }
            )
        sources.append(
            {
                "coreId": core["core_id"],
                "hostName": core["host_name"],
                "customerId": core["customer_id"],
                "pairingState": core["state"],
                "agents": agent_rows,
                "totals": {
                    key: sum(a[key] or 0 for a in agent_rows)
                    for key in (
                        "protectedBytesAverage",
                        "protectedBytesPeak",
                        "storedUniqueBytes",
                        "storedSharedBytes",
                        "storedBytes",
                        "recoveryPoints",
                    )
                },
            }
        )
    names = {r["id"]: r["name"] for r in rows(conn, "SELECT id, name FROM repositories")}
    return {
        "month": month,
        "from": start,
        "to": end,
        "generatedAt": now,
        "sources": sources,
        "repositories": [
            {
                "name": names.get(repository_id, str(repository_id)),
                "storedBytes": usage["stored"],
                "attributedBytes": usage["attributed"],
                "unattributedBytes": usage["stored"] - usage["attributed"],
            }
            for repository_id, usage in sorted(per_repository.items())
        ],
    }
