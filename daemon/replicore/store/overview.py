"""What the operator's console reads across aggregates that no other store module answers, and
the one operator write the store lacked: pausing a whole source.

No tables of its own. Reads `repositories`, `records`, `volume_images`, `image_blocks`
(deduplication figures), `master_cores`, `jobs`, `sessions`, `storage_reports` (when a
source was last heard from), and volume image chains (orphaned images, through
`inventory.orphan_epochs`). Writes `master_cores.paused`, which the data path reads (a paused
source opens no session; store/cores.py owns the column).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import apsw

from ..errors import Conflict
from . import cores, inventory
from .db import rows


def repository_reduction(conn: apsw.Connection) -> dict[int, dict[str, int]]:
    """Per repository id: `logical_bytes` (the bytes of the blocks its volume images hold,
    counted once per image holding them), `unique_bytes` (uncompressed bytes of the distinct
    records they reference) and `stored_bytes` (the compressed size of those records).
    Deduplication ratio = logical / unique; compression = unique / stored."""
    found: dict[int, dict[str, int]] = defaultdict(
        lambda: {"logical_bytes": 0, "unique_bytes": 0, "stored_bytes": 0}
    )
    for r in rows(
        conn,
        "SELECT vi.repository_id, sum(r.raw_length) AS logical FROM image_blocks ib"
        " JOIN volume_images vi ON vi.id = ib.image_id"
        " JOIN records r ON r.repository_id = vi.repository_id AND r.key = ib.key"
        " GROUP BY vi.repository_id",
    ):
        found[r["repository_id"]]["logical_bytes"] = int(r["logical"] or 0)
    for r in rows(
        conn,
        "WITH refs AS (SELECT DISTINCT vi.repository_id, ib.key FROM image_blocks ib"
        "   JOIN volume_images vi ON vi.id = ib.image_id)"
        " SELECT refs.repository_id, sum(r.raw_length) AS raw, sum(r.stored_length) AS stored"
        " FROM refs JOIN records r ON r.repository_id = refs.repository_id AND r.key = refs.key"
        " GROUP BY refs.repository_id",
    ):
        found[r["repository_id"]]["unique_bytes"] = int(r["raw"] or 0)
        found[r["repository_id"]]["stored_bytes"] = int(r["stored"] or 0)
    return dict(found)


def last_heard(conn: apsw.Connection) -> dict[int, float]:
    """Per source core id (row id): the last time it was heard from, the latest of its
    pairing syncs, job syncs, data-path sessions, commits and usage reports."""
    found: dict[int, float] = {}
    for r in rows(
        conn,
        "SELECT c.id, max(coalesce(c.last_contact_at, 0), coalesce(c.confirmed_at, 0),"
        " coalesce((SELECT max(j.synced_at) FROM jobs j WHERE j.core_pk = c.id), 0),"
        " coalesce((SELECT max(s.last_activity_at) FROM sessions s JOIN agents a"
        "   ON a.id = s.agent_pk WHERE a.core_pk = c.id), 0),"
        " coalesce((SELECT max(v.committed_at) FROM volume_images v JOIN agents a"
        "   ON a.id = v.agent_pk WHERE a.core_pk = c.id), 0),"
        " coalesce((SELECT max(r.received_at) FROM storage_reports r WHERE r.core_pk = c.id), 0)"
        " ) AS heard FROM master_cores c",
    ):
        if r["heard"]:
            found[r["id"]] = float(r["heard"])
    return found


def orphaned_images(conn: apsw.Connection) -> list[dict[str, Any]]:
    """Every live volume image whose chain is broken: agent row id, agent id, source core id,
    `volumeImage` ('vol:epoch') and the first `missingEpoch` of its chain."""
    images = rows(
        conn,
        "SELECT vi.id, vi.agent_pk, vi.driver_volume_id, vi.epoch_number,"
        " vi.previous_epoch_number, a.agent_id, c.core_id AS source_core_id"
        " FROM volume_images vi JOIN agents a ON a.id = vi.agent_pk"
        " JOIN master_cores c ON c.id = a.core_pk ORDER BY vi.agent_pk, vi.id",
    )
    by_agent: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for image in images:
        by_agent[image["agent_pk"]].append(image)
    found = []
    for agent_images in by_agent.values():
        missing = inventory.orphan_epochs(agent_images)
        for image in agent_images:
            if missing[image["id"]] is not None:
                found.append(
                    {
                        "agent_pk": image["agent_pk"],
                        "agentId": image["agent_id"],
                        "sourceCoreId": image["source_core_id"],
                        "volumeImage": f"{image['driver_volume_id']}:{image['epoch_number']}",
                        "missingEpoch": missing[image["id"]],
                    }
                )
    return found


def agent_counts(conn: apsw.Connection) -> dict[str, int]:
    """Agents of paired sources by state (pending: added by the source, awaiting the
    operator; approved; denied), and `paused` (approved agents paused by the operator, by
    themselves or through their source). Agents of undecided pairing requests are not
    counted (they are part of their request)."""
    counts = {"pending": 0, "approved": 0, "denied": 0, "paused": 0}
    for r in rows(
        conn,
        "SELECT a.state, count(*) AS n FROM agents a JOIN master_cores c ON c.id = a.core_pk"
        " WHERE c.state = 'approved' GROUP BY a.state",
    ):
        counts[r["state"]] = int(r["n"])
    paused = conn.execute(
        "SELECT count(*) FROM agents a JOIN master_cores c ON c.id = a.core_pk"
        " LEFT JOIN agent_status s ON s.agent_pk = a.id WHERE a.state = 'approved'"
        " AND (a.paused = 1 OR c.paused = 1 OR coalesce(s.paused, 0) = 1)"
    ).fetchone()
    counts["paused"] = int(paused[0])
    return counts


def set_source_pause(conn: apsw.Connection, core_pk: int, paused: bool) -> dict[str, Any]:
    """Pause (or resume) replication from a paired source: none of its agents may open a
    session while it is paused. Conflict unless the source is paired."""
    core = cores.get(conn, core_pk)
    if core["state"] != "approved":
        raise Conflict(f"source {core['core_id']} is {core['state']}, not paired")
    conn.execute("UPDATE master_cores SET paused = ? WHERE id = ?", (int(paused), core_pk))
    return cores.get(conn, core_pk)
