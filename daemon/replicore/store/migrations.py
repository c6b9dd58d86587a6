"""The versioned schema: which steps exist and applying them at start.

The schema version is SQLite's `user_version`. Each step is a list of SQL scripts, mostly
the `SCHEMA` of the aggregate modules, applied in one transaction. Released steps are never
edited: a change to a table is a new step appended in `_steps`, and `LATEST` raised to its
number. The store modules are imported when the steps are first needed (`apply`, `STEPS`),
not when a command opens the database and only checks its version against `LATEST`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw

from .db import transaction

Step = tuple[int, str, list[str]]

#: The newest schema version, the number of the last of the steps (a test checks it): known
#: without importing the store modules, so that opening the database for a command
#: (`db.open_existing`) does not import every store module, and what they import, for their
#: SCHEMA.
LATEST = 1


def _steps() -> list[Step]:
    """The steps, built from the store modules' SCHEMA (imported here, on first use)."""
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

    return [
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


def __getattr__(name: str) -> Any:
    """`STEPS`, built on first use and kept as a module attribute from then on (so that it
    can be replaced, as a test does)."""
    if name == "STEPS":
        steps = globals()["STEPS"] = _steps()
        return steps
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _current_steps() -> list[Step]:
    """`STEPS`: the module attribute once built (or replaced), else built now."""
    steps: list[Step] = globals()["STEPS"] if "STEPS" in globals() else __getattr__("STEPS")
    return steps


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
    for number, _description, scripts in _current_steps():
        if number <= version:
            continue
        if version > 0 and not applied and before_change is not None:
            before_change(version)
        with transaction(conn):
            for script in scripts:
                conn.execute(script)
            if number == 1:
                from . import meta

                meta.initialise(conn, time.time())
            conn.execute(f"PRAGMA user_version={number}")
        applied.append(number)
    return applied
