"""The recycle bin: what a source deletes (an agent with its recovery points, or all of them
when it unpairs with `deleteRecoveryPoints=true`) is kept here, out of the source's sight and
outside its quota, until the operator restores or purges it or its time is up.

Owns `bin_entries` (one per deleted agent: the agent row and the rows of its side tables as
JSON, who deleted it and when), `bin_recovery_points`, `bin_volume_images` and
`bin_image_blocks` (the agent's recovery points and images, moved out of the live tables),
and `bin_usage` (per repository, the stored bytes of records only binned images reference).

Binning moves the rows out of `agents`, `recovery_points`, `volume_images` and `image_blocks`
in one transaction, so every query of the live tables (the data path, the inventory, billing,
exports) stops seeing the agent at once, and the source may even add an agent of that id
again. The records stay where they are: `bin_image_blocks` references them, garbage
collection (`store/gc.py`) keeps every record a binned image references, and deduplication
may still reuse them. Restoring moves the rows back (into the live agent of that id if the
source has added it again, refusing if an epoch or recovery point id clashes). Purging
deletes the entry; its records become garbage unless something else references them.

Quota: `bin_usage` is subtracted from a repository's used bytes (registered in
`repositories.USAGE_SOURCES`). It is recounted whenever the bin changes and by the daemon's
periodic sweep; in between, a record that a new push starts sharing with a binned image is
not yet counted as used again.
"""

from __future__ import annotations

import json
from typing import Any

import apsw

from ..errors import Conflict, NotFound
from . import agents, cores, repositories
from .db import row, rows

SCHEMA = """
CREATE TABLE bin_entries (
    id                   INTEGER PRIMARY KEY,
    -- No foreign key: the entry outlives a master core row that is dropped.
    core_pk              INTEGER NOT NULL,
    source_core_id       TEXT NOT NULL,
    source_host_name     TEXT NOT NULL,
    agent_id             TEXT NOT NULL,
    display_name         TEXT NOT NULL,
    agent                TEXT NOT NULL,
    extras               TEXT NOT NULL,
    reason               TEXT NOT NULL CHECK (reason IN ('source', 'unpair', 'operator')),
    deleted_by           TEXT NOT NULL DEFAULT '',
    deleted_at           REAL NOT NULL,
    recovery_point_count INTEGER NOT NULL,
    image_count          INTEGER NOT NULL,
    protected_bytes      INTEGER NOT NULL
) STRICT;
CREATE INDEX bin_entries_deleted_at ON bin_entries(deleted_at);
CREATE TABLE bin_recovery_points (
    id       INTEGER PRIMARY KEY,
    entry_id INTEGER NOT NULL REFERENCES bin_entries(id) ON DELETE CASCADE,
    fields   TEXT NOT NULL
) STRICT;
CREATE INDEX bin_recovery_points_entry ON bin_recovery_points(entry_id);
CREATE TABLE bin_volume_images (
    id                INTEGER PRIMARY KEY,
    entry_id          INTEGER NOT NULL REFERENCES bin_entries(id) ON DELETE CASCADE,
    recovery_point_id INTEGER NOT NULL REFERENCES bin_recovery_points(id) ON DELETE CASCADE,
    repository_id     INTEGER NOT NULL REFERENCES repositories(id),
    fields            TEXT NOT NULL
) STRICT;
CREATE INDEX bin_volume_images_entry ON bin_volume_images(entry_id);
CREATE INDEX bin_volume_images_recovery_point ON bin_volume_images(recovery_point_id);
CREATE INDEX bin_volume_images_repository ON bin_volume_images(repository_id);
CREATE TABLE bin_image_blocks (
    image_id    INTEGER NOT NULL REFERENCES bin_volume_images(id) ON DELETE CASCADE,
    block_index INTEGER NOT NULL,
    key         BLOB NOT NULL,
    PRIMARY KEY (image_id, block_index)
) STRICT, WITHOUT ROWID;
CREATE TABLE bin_usage (
    repository_id   INTEGER PRIMARY KEY REFERENCES repositories(id) ON DELETE CASCADE,
    exclusive_bytes INTEGER NOT NULL,
    counted_at      REAL NOT NULL
) STRICT;
"""

DAY = 86400.0

#: Tables keyed by the agent whose rows an entry keeps and a restore puts back (those that
#: exist in this schema), with the column holding the agent's row id.
SIDE_TABLES = [
    ("agent_metadata", "agent_pk"),
    ("agent_volumes", "agent_pk"),
    ("agent_applications", "agent_pk"),
    ("agent_status", "agent_pk"),
    ("agent_request_repositories", "agent_pk"),
    ("retention_policies", "agent_pk"),
]


def _existing_tables(conn: apsw.Connection) -> set[str]:
    return {r["name"] for r in rows(conn, "SELECT name FROM sqlite_master WHERE type = 'table'")}


def _columns(conn: apsw.Connection, table: str) -> list[str]:
    return [r["name"] for r in rows(conn, f"SELECT name FROM pragma_table_info('{table}')")]


def _insert(conn: apsw.Connection, table: str, fields: dict[str, Any]) -> int:
    """Insert `fields` (only the columns the table has) into `table`; the new rowid."""
    known = set(_columns(conn, table))
    kept = {k: v for k, v in fields.items() if k in known}
    names = ",".join(kept)
    marks = ",".join("?" * len(kept))
    conn.execute(f"INSERT INTO {table}({names}) VALUES ({marks})", tuple(kept.values()))
    return conn.last_insert_rowid()


# --------------------------------------------------------------------------
# Moving an agent into the bin
# --------------------------------------------------------------------------


def has_data(conn: apsw.Connection, agent_pk: int) -> bool:
    found = row(
        conn,
        "SELECT 1 AS x FROM recovery_points WHERE agent_pk = ? UNION ALL"
        " SELECT 1 FROM volume_images WHERE agent_pk = ? LIMIT 1",
        (agent_pk, agent_pk),
    )
    return found is not None


def bin_agent(
    conn: apsw.Connection, agent_pk: int, *, reason: str, deleted_by: str, now: float
) -> dict[str, Any]:
    """Move the agent, its recovery points and images into the bin (one transaction: the
    caller's). An agent with no recovery point and no image is simply deleted (there is
    nothing to keep). Its open sessions are discarded. Returns a summary; `entryId` is None
    when nothing was binned."""
    agent = row(conn, "SELECT * FROM agents WHERE id = ?", (agent_pk,))
    if agent is None:
        raise NotFound(f"no agent row {agent_pk}")
    if not has_data(conn, agent_pk):
        conn.execute("DELETE FROM agents WHERE id = ?", (agent_pk,))
        return {"agentId": agent["agent_id"], "entryId": None, "recoveryPointCount": 0}
    core = row(conn, "SELECT * FROM master_cores WHERE id = ?", (agent["core_pk"],)) or {}
    tables = _existing_tables(conn)
    extras = {
        table: rows(conn, f"SELECT * FROM {table} WHERE {column} = ?", (agent_pk,))
        for table, column in SIDE_TABLES
        if table in tables
    }
    points = rows(conn, "SELECT * FROM recovery_points WHERE agent_pk = ? ORDER BY id", (agent_pk,))
    volume_images = rows(
        conn, "SELECT * FROM volume_images WHERE agent_pk = ? ORDER BY id", (agent_pk,)
    )
    protected = sum(
        image["size"]
        for image in rows(
            conn,
            "SELECT vi.size FROM volume_images vi WHERE vi.agent_pk = ? AND vi.epoch_number ="
            " (SELECT max(epoch_number) FROM volume_images x WHERE x.agent_pk = vi.agent_pk"
            " AND x.driver_volume_id = vi.driver_volume_id)",
            (agent_pk,),
        )
    )
    conn.execute(
        "INSERT INTO bin_entries(core_pk, source_core_id, source_host_name, agent_id,"
        " display_name, agent, extras, reason, deleted_by, deleted_at, recovery_point_count,"
        " image_count, protected_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            agent["core_pk"],
            core.get("core_id", ""),
            core.get("host_name", ""),
            agent["agent_id"],
            agent["display_name"],
            json.dumps(agent),
            json.dumps(extras),
            reason,
            deleted_by,
            now,
            len(points),
            len(volume_images),
            protected,
        ),
    )
    entry_id = conn.last_insert_rowid()
    point_ids: dict[int, int] = {}
    for point in points:
        conn.execute(
            "INSERT INTO bin_recovery_points(entry_id, fields) VALUES (?, ?)",
            (entry_id, json.dumps(point)),
        )
        point_ids[point["id"]] = conn.last_insert_rowid()
    for image in volume_images:
        conn.execute(
            "INSERT INTO bin_volume_images(entry_id, recovery_point_id, repository_id, fields)"
            " VALUES (?, ?, ?, ?)",
            (
                entry_id,
                point_ids[image["recovery_point_pk"]],
                image["repository_id"],
                json.dumps(image),
            ),
        )
        binned = conn.last_insert_rowid()
        conn.execute(
            "INSERT INTO bin_image_blocks(image_id, block_index, key)"
            " SELECT ?, block_index, key FROM image_blocks WHERE image_id = ?",
            (binned, image["id"]),
        )
        conn.execute("DELETE FROM image_blocks WHERE image_id = ?", (image["id"],))
    # Cascades: recovery points, images, sessions, jobs, metadata and our side tables.
    conn.execute("DELETE FROM agents WHERE id = ?", (agent_pk,))
    recount(conn, {image["repository_id"] for image in volume_images}, now)
    return {
        "agentId": agent["agent_id"],
        "entryId": entry_id,
        "recoveryPointCount": len(points),
    }


def bin_core_agents(
    conn: apsw.Connection, core_pk: int, *, reason: str, deleted_by: str, now: float
) -> list[dict[str, Any]]:
    """Bin every agent of the core that holds recovery points or images."""
    done = []
    for agent in agents.for_core(conn, core_pk):
        if has_data(conn, agent["id"]):
            done.append(bin_agent(conn, agent["id"], reason=reason, deleted_by=deleted_by, now=now))
    return done


def unpair(
    conn: apsw.Connection, core_pk: int, *, delete_recovery_points: bool, now: float
) -> dict[str, Any]:
    """`cores.unpair`, and with `delete_recovery_points` its agents' data into the bin."""
    core = cores.unpair(conn, core_pk, delete_recovery_points=delete_recovery_points, now=now)
    if delete_recovery_points:
        bin_core_agents(conn, core_pk, reason="unpair", deleted_by="source", now=now)
    return core


# --------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------


def _describe(entry: dict[str, Any], retention_seconds: float) -> dict[str, Any]:
    return {
        "id": entry["id"],
        "sourceCoreId": entry["source_core_id"],
        "sourceHostName": entry["source_host_name"],
        "agentId": entry["agent_id"],
        "displayName": entry["display_name"],
        "reason": entry["reason"],
        "deletedBy": entry["deleted_by"],
        "deletedAt": entry["deleted_at"],
        "expiresAt": entry["deleted_at"] + retention_seconds,
        "recoveryPointCount": entry["recovery_point_count"],
        "imageCount": entry["image_count"],
        "protectedBytes": entry["protected_bytes"],
    }


def get(conn: apsw.Connection, entry_id: int) -> dict[str, Any]:
    found = row(conn, "SELECT * FROM bin_entries WHERE id = ?", (entry_id,))
    if found is None:
        raise NotFound(f"the recycle bin has no entry {entry_id}", field="entryId")
    return found


def entries(
    conn: apsw.Connection, retention_seconds: float, *, with_bytes: bool = False
) -> list[dict[str, Any]]:
    """Every entry, oldest first; with `with_bytes`, `freedBytes`: the stored bytes of the
    records only that entry references (what purging it and collecting garbage frees)."""
    found = [
        _describe(entry, retention_seconds)
        for entry in rows(conn, "SELECT * FROM bin_entries ORDER BY deleted_at, id")
    ]
    if with_bytes:
        for entry in found:
            entry["freedBytes"] = exclusive_bytes_of_entry(conn, entry["id"])
    return found


def describe(conn: apsw.Connection, entry_id: int, retention_seconds: float) -> dict[str, Any]:
    entry = _describe(get(conn, entry_id), retention_seconds)
    entry["recoveryPoints"] = [
        json.loads(r["fields"])
        for r in rows(
            conn,
            "SELECT fields FROM bin_recovery_points WHERE entry_id = ? ORDER BY id",
            (entry_id,),
        )
    ]
    entry["freedBytes"] = exclusive_bytes_of_entry(conn, entry_id)
    return entry


# --------------------------------------------------------------------------
# Restoring and purging
# --------------------------------------------------------------------------


def _clashes(conn: apsw.Connection, entry_id: int, live_pk: int) -> str | None:
    for fields in _loaded(conn, "bin_recovery_points", entry_id):
        if row(
            conn,
            "SELECT 1 AS x FROM recovery_points WHERE agent_pk = ? AND recovery_point_id = ?",
            (live_pk, fields["recovery_point_id"]),
        ):
            return f"recovery point {fields['recovery_point_id']!r}"
    for fields in _loaded(conn, "bin_volume_images", entry_id):
        volume, epoch = fields["driver_volume_id"], fields["epoch_number"]
        for table in ("volume_images", "sessions"):
            if row(
                conn,
                f"SELECT 1 AS x FROM {table} WHERE agent_pk = ? AND driver_volume_id = ?"
                " AND epoch_number = ?",
                (live_pk, volume, epoch),
            ):
                what = "volume image" if table == "volume_images" else "an open session of"
                return f"{what} {volume}:{epoch}"
    return None


def _loaded(conn: apsw.Connection, table: str, entry_id: int) -> list[dict[str, Any]]:
    return [
        json.loads(r["fields"])
        for r in rows(
            conn, f"SELECT fields FROM {table} WHERE entry_id = ? ORDER BY id", (entry_id,)
        )
    ]


def restore(conn: apsw.Connection, entry_id: int, now: float) -> dict[str, Any]:
    """Put the entry's agent, recovery points and images back (in the caller's one
    transaction). If the source has added an agent of that id again, the recovery points
    join it, unless one of them (or an epoch) is already there: Conflict, nothing changes.
    Conflict too when the source's master core row is gone."""
    entry = get(conn, entry_id)
    if row(conn, "SELECT id FROM master_cores WHERE id = ?", (entry["core_pk"],)) is None:
        raise Conflict(
            f"source {entry['source_core_id']} of entry {entry_id} is no longer known to this"
            " core; its data cannot be restored"
        )
    live = agents.get(conn, entry["core_pk"], entry["agent_id"])
    merged = live is not None
    if live is not None:
        clash = _clashes(conn, entry_id, live["id"])
        if clash is not None:
            raise Conflict(
                f"agent {entry['agent_id']} of source {entry['source_core_id']} was added again"
                f" and already has {clash}; purge or keep the entry",
                entryId=entry_id,
            )
        agent_pk = int(live["id"])
    else:
        fields = json.loads(entry["agent"])
        fields.pop("id", None)
        agent_pk = _insert(conn, "agents", fields)
        tables = _existing_tables(conn)
        for table, column in SIDE_TABLES:
            if table not in tables:
                continue
            for saved in json.loads(entry["extras"]).get(table, []):
                saved = {**saved, column: agent_pk}
                if table == "retention_policies":
                    saved.pop("id", None)
                _insert(conn, table, saved)
    point_ids: dict[int, int] = {}
    for binned in rows(
        conn,
        "SELECT id, fields FROM bin_recovery_points WHERE entry_id = ? ORDER BY id",
        (entry_id,),
    ):
        fields = json.loads(binned["fields"])
        fields.pop("id", None)
        fields["agent_pk"] = agent_pk
        point_ids[binned["id"]] = _insert(conn, "recovery_points", fields)
    repository_ids = set()
    for binned in rows(
        conn,
        "SELECT id, recovery_point_id, fields FROM bin_volume_images WHERE entry_id = ?"
        " ORDER BY id",
        (entry_id,),
    ):
        fields = json.loads(binned["fields"])
        fields.pop("id", None)
        fields["agent_pk"] = agent_pk
        fields["recovery_point_pk"] = point_ids[binned["recovery_point_id"]]
        repository_ids.add(fields["repository_id"])
        image_id = _insert(conn, "volume_images", fields)
        conn.execute(
            "INSERT INTO image_blocks(image_id, block_index, key)"
            " SELECT ?, block_index, key FROM bin_image_blocks WHERE image_id = ?",
            (image_id, binned["id"]),
        )
    _delete_entry(conn, entry_id)
    recount(conn, repository_ids, now)
    return {
        "entryId": entry_id,
        "sourceCoreId": entry["source_core_id"],
        "agentId": entry["agent_id"],
        "recoveryPointCount": len(point_ids),
        "mergedIntoLiveAgent": merged,
    }


def _entry_repositories(conn: apsw.Connection, entry_id: int) -> set[int]:
    return {
        r["repository_id"]
        for r in rows(
            conn,
            "SELECT DISTINCT repository_id FROM bin_volume_images WHERE entry_id = ?",
            (entry_id,),
        )
    }


def _delete_entry(conn: apsw.Connection, entry_id: int) -> None:
    conn.execute(
        "DELETE FROM bin_image_blocks WHERE image_id IN"
        " (SELECT id FROM bin_volume_images WHERE entry_id = ?)",
        (entry_id,),
    )
    conn.execute("DELETE FROM bin_volume_images WHERE entry_id = ?", (entry_id,))
    conn.execute("DELETE FROM bin_recovery_points WHERE entry_id = ?", (entry_id,))
    conn.execute("DELETE FROM bin_entries WHERE id = ?", (entry_id,))


def purge(conn: apsw.Connection, entry_id: int, now: float) -> dict[str, Any]:
    """Delete the entry for good; its records are left to garbage collection."""
    entry = get(conn, entry_id)
    touched = _entry_repositories(conn, entry_id)
    _delete_entry(conn, entry_id)
    recount(conn, touched, now)
    return {
        "entryId": entry_id,
        "sourceCoreId": entry["source_core_id"],
        "agentId": entry["agent_id"],
        "recoveryPointCount": entry["recovery_point_count"],
    }


def expired(conn: apsw.Connection, now: float, retention_seconds: float) -> list[int]:
    return [
        r["id"]
        for r in rows(
            conn,
            "SELECT id FROM bin_entries WHERE deleted_at + ? <= ? ORDER BY id",
            (retention_seconds, now),
        )
    ]


def purge_expired(conn: apsw.Connection, now: float, retention_seconds: float) -> list[int]:
    """Purge the entries whose time is up; their ids."""
    found = expired(conn, now, retention_seconds)
    for entry_id in found:
        purge(conn, entry_id, now)
    return found


# --------------------------------------------------------------------------
# Space
# --------------------------------------------------------------------------

_LIVE_KEYS = (
    "SELECT ib.key FROM image_blocks ib JOIN volume_images vi ON vi.id = ib.image_id"
    " WHERE vi.repository_id = :repo"
)


def _binned_only_bytes(conn: apsw.Connection, repository_id: int) -> int:
    found = conn.execute(
        "SELECT coalesce(sum(r.stored_length), 0) FROM records r"
        " WHERE r.repository_id = :repo AND r.key IN (SELECT bb.key FROM bin_image_blocks bb"
        " JOIN bin_volume_images bv ON bv.id = bb.image_id WHERE bv.repository_id = :repo)"
        f" AND r.key NOT IN ({_LIVE_KEYS})",
        {"repo": repository_id},
    ).fetchone()
    return int(found[0])


def exclusive_bytes_of_entry(conn: apsw.Connection, entry_id: int) -> int:
    """Stored bytes of the records only this entry references (nothing live, no other
    entry): what purging it frees once garbage is collected."""
    total = 0
    for repository_id in _entry_repositories(conn, entry_id):
        found = conn.execute(
            "SELECT coalesce(sum(r.stored_length), 0) FROM records r"
            " WHERE r.repository_id = :repo AND r.key IN (SELECT bb.key FROM bin_image_blocks bb"
            " JOIN bin_volume_images bv ON bv.id = bb.image_id"
            " WHERE bv.entry_id = :entry AND bv.repository_id = :repo)"
            f" AND r.key NOT IN ({_LIVE_KEYS})"
            " AND r.key NOT IN (SELECT bb.key FROM bin_image_blocks bb"
            " JOIN bin_volume_images bv ON bv.id = bb.image_id"
            " WHERE bv.entry_id != :entry AND bv.repository_id = :repo)",
            {"repo": repository_id, "entry": entry_id},
        ).fetchone()
        total += int(found[0])
    return total


def recount(conn: apsw.Connection, repository_ids: set[int] | None, now: float) -> None:
    """Recount `bin_usage` for these repositories (all when None)."""
    if repository_ids is None:
        repository_ids = {r["id"] for r in rows(conn, "SELECT id FROM repositories")}
    for repository_id in repository_ids:
        has_binned = row(
            conn,
            "SELECT 1 AS x FROM bin_volume_images WHERE repository_id = ? LIMIT 1",
            (repository_id,),
        )
        if has_binned is None:
            conn.execute("DELETE FROM bin_usage WHERE repository_id = ?", (repository_id,))
            continue
        conn.execute(
            "INSERT INTO bin_usage(repository_id, exclusive_bytes, counted_at) VALUES (?, ?, ?)"
            " ON CONFLICT (repository_id) DO UPDATE SET exclusive_bytes = excluded.exclusive_bytes,"
            " counted_at = excluded.counted_at",
            (repository_id, _binned_only_bytes(conn, repository_id), now),
        )


def binned_bytes(conn: apsw.Connection, repository_id: int) -> int:
    """Stored bytes of the repository that only binned images use (outside the quota)."""
    found = conn.execute(
        "SELECT exclusive_bytes FROM bin_usage WHERE repository_id = ?", (repository_id,)
    ).fetchone()
    return int(found[0]) if found else 0


def _not_counted(conn: apsw.Connection, repository_id: int) -> int:
    return -binned_bytes(conn, repository_id)


def register_usage() -> None:
    if _not_counted not in repositories.USAGE_SOURCES:
        repositories.USAGE_SOURCES.append(_not_counted)


register_usage()
