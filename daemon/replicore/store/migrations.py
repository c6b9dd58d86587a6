"""The versioned schema: which steps exist and applying them at start.

The schema version is SQLite's `user_version`. Each step is a list of SQL scripts, mostly
the `SCHEMA` of the aggregate modules, applied in one transaction. Released steps are never
edited: a change to a table is a new step appended here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import apsw

from . import (
    admins,
    agents,
    audit,
    billing,
    console_sessions,
    cores,
    direct,
    exchange,
    images,
    inventory,
    jobs,
    meta,
    metadata,
    records,
    recycle_bin,
    repositories,
    retention,
    seed_drives,
    sessions,
    uploads,
    usage_history,
    verify,
)
from .db import transaction

Step = tuple[int, str, list[str]]

STEPS: list[Step] = [
    (
        1,
        "initial schema",
        [
            meta.SCHEMA,
            repositories.SCHEMA,
            admins.SCHEMA,
            cores.SCHEMA,
            agents.SCHEMA,
            records.SCHEMA,
            images.SCHEMA,
            sessions.SCHEMA,
            jobs.SCHEMA,
            metadata.SCHEMA,
            uploads.SCHEMA,
            exchange.SCHEMA,
            billing.SCHEMA,
            seed_drives.SCHEMA,
            audit.SCHEMA,
            direct.SCHEMA,
            inventory.SCHEMA,
            recycle_bin.SCHEMA,
            retention.SCHEMA,
            verify.SCHEMA,
            console_sessions.SCHEMA,
            usage_history.SCHEMA,
        ],
    ),
]

LATEST = STEPS[-1][0]


class SchemaTooNew(RuntimeError):
    """The database was written by a newer replicore."""


def current_version(conn: apsw.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_current(conn: apsw.Connection, path: Path) -> None:
    version = current_version(conn)
    if version > LATEST:
        raise SchemaTooNew(f"{path} has schema {version}; this replicore knows up to {LATEST}")


def apply(
    conn: apsw.Connection, path: Path, before_change: Callable[[int], None] | None = None
) -> list[int]:
    """Bring the schema up to date; returns the versions applied.

    `before_change(version)` runs once before the first step that changes an existing
    database (the daemon takes a backup copy there)."""
    check_current(conn, path)
    version = current_version(conn)
    applied: list[int] = []
    for number, _description, scripts in STEPS:
        if number <= version:
            continue
        if version > 0 and not applied and before_change is not None:
            before_change(version)
        with transaction(conn):
            for script in scripts:
                conn.execute(script)
            if number == 1:
                meta.initialise(conn, time.time())
            conn.execute(f"PRAGMA user_version={number}")
        applied.append(number)
    return applied
