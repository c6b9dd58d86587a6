"""The history of what each source stores here: samples of its stored bytes over time, for the
console's billing chart (stored bytes per customer over time).

Owns `usage_samples`: one row per source core and sample time, with the customer id the core
had then and its stored bytes as `store/billing.py` counts them (records unique to its agents
plus their equal share of records shared with other agents; compressed size). The daemon's
console takes a sample every `console.usage_sample_interval` seconds (`measure` on a reader,
then `record`); samples older than `KEEP_SECONDS` are dropped when a new one is recorded.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import apsw

from . import billing
from .db import rows

SCHEMA = """
CREATE TABLE usage_samples (
    core_pk      INTEGER NOT NULL REFERENCES master_cores(id) ON DELETE CASCADE,
    at           REAL NOT NULL,
    customer_id  TEXT NOT NULL,
    stored_bytes INTEGER NOT NULL CHECK (stored_bytes >= 0),
    PRIMARY KEY (core_pk, at)
) STRICT;
CREATE INDEX usage_samples_at ON usage_samples(at);
"""

#: Samples are kept two years.
KEEP_SECONDS = 2 * 366 * 86400.0


def measure(conn: apsw.Connection) -> list[dict[str, Any]]:
    """Per source core that is paired or has agents in a repository: `core_pk`,
    `customer_id`, `stored_bytes` now (0 for a source whose agents are all in the bin)."""
    per_agent, _ = billing.stored_bytes(conn)
    owner = {
        r["id"]: r["core_pk"]
        for r in rows(conn, "SELECT id, core_pk FROM agents WHERE repository_id IS NOT NULL")
    }
    stored: dict[int, int] = defaultdict(int)
    for agent_pk, held in per_agent.items():
        if agent_pk in owner:
            stored[owner[agent_pk]] += held["unique"] + held["shared"]
    return [
        {
            "core_pk": core["id"],
            "customer_id": core["customer_id"],
            "stored_bytes": stored[core["id"]],
        }
        for core in rows(
            conn,
            "SELECT id, customer_id FROM master_cores c WHERE c.state = 'approved'"
            " OR EXISTS (SELECT 1 FROM agents a WHERE a.core_pk = c.id"
            " AND a.repository_id IS NOT NULL) ORDER BY id",
        )
    ]


def record(conn: apsw.Connection, measured: list[dict[str, Any]], at: float) -> int:
    """Store one sample per measured core at time `at` (cores gone since are skipped); drop
    samples older than `KEEP_SECONDS`. Returns the rows written."""
    written = 0
    for sample in measured:
        conn.execute(
            "INSERT INTO usage_samples(core_pk, at, customer_id, stored_bytes)"
            " SELECT id, ?, ?, ? FROM master_cores WHERE id = ?"
            " ON CONFLICT (core_pk, at) DO UPDATE SET stored_bytes = excluded.stored_bytes,"
            " customer_id = excluded.customer_id",
            (at, sample["customer_id"], sample["stored_bytes"], sample["core_pk"]),
        )
        written += conn.changes()
    conn.execute("DELETE FROM usage_samples WHERE at < ?", (at - KEEP_SECONDS,))
    return written


def last_sample_at(conn: apsw.Connection) -> float | None:
    found = conn.execute("SELECT max(at) FROM usage_samples").fetchone()
    return None if found[0] is None else float(found[0])


def customer_label(customer_id: str, host_name: str, core_id: str) -> str:
    """How a customer is named on the chart: its id, else the source it is."""
    return customer_id or f"source {host_name or core_id} (no customer id)"


def per_customer(conn: apsw.Connection, since: float, until: float) -> dict[str, list[list[float]]]:
    """Stored bytes per customer in [since, until): label -> [[at, bytes], ...] oldest first.
    The sources of one customer taken at the same sample time are added up."""
    totals: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for sample in rows(
        conn,
        "SELECT s.at, s.customer_id, s.stored_bytes, c.host_name, c.core_id"
        " FROM usage_samples s JOIN master_cores c ON c.id = s.core_pk"
        " WHERE s.at >= ? AND s.at < ? ORDER BY s.at",
        (since, until),
    ):
        label = customer_label(sample["customer_id"], sample["host_name"], sample["core_id"])
        totals[label][sample["at"]] += sample["stored_bytes"]
    return {
        label: [[at, value] for at, value in sorted(points.items())]
        for label, points in sorted(totals.items())
    }
