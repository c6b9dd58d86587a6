"""Repositories: named storage partitions with an optional quota; dedup stays inside one."""

from __future__ import annotations

import re
import time
from typing import Any

import apsw

from ..errors import Conflict, NotFound, Unprocessable
from .db import row, rows

SCHEMA = """
CREATE TABLE repositories (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    quota_bytes INTEGER CHECK (quota_bytes IS NULL OR quota_bytes >= 0),
    created_at  REAL NOT NULL
) STRICT;
"""

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: Functions that add to a repository's used bytes; the data path registers its own.
#: Each is f(conn, repository_id) -> int.
USAGE_SOURCES: list[Any] = []


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise Unprocessable(
            "repository name must be 1-64 of letters, digits, '.', '_', '-'", field="name"
        )
    return name


def create(conn: apsw.Connection, name: str, quota_bytes: int | None = None) -> int:
    check_name(name)
    if row(conn, "SELECT id FROM repositories WHERE name = ?", (name,)):
        raise Conflict(f"repository {name!r} already exists", field="name")
    conn.execute(
        "INSERT INTO repositories(name, quota_bytes, created_at) VALUES (?, ?, ?)",
        (name, quota_bytes, time.time()),
    )
    return conn.last_insert_rowid()


def create_unique(conn: apsw.Connection, base: str) -> int:
    """Create a repository named base, or base-2, base-3, ... whichever is free."""
    base = re.sub(r"[^A-Za-z0-9._-]", "-", base)[:56].strip("-") or "repository"
    name, n = base, 1
    while row(conn, "SELECT id FROM repositories WHERE name = ?", (name,)):
        n += 1
        name = f"{base}-{n}"
    return create(conn, name)


def by_name(conn: apsw.Connection, name: str) -> dict[str, Any]:
    found = row(conn, "SELECT * FROM repositories WHERE name = ?", (name,))
    if found is None:
        raise NotFound(f"no repository named {name!r}", field="repository")
    return found


def by_id(conn: apsw.Connection, repository_id: int) -> dict[str, Any]:
    found = row(conn, "SELECT * FROM repositories WHERE id = ?", (repository_id,))
    if found is None:
        raise NotFound(f"no repository with id {repository_id}")
    return found


def used_bytes(conn: apsw.Connection, repository_id: int) -> int:
    return sum(int(source(conn, repository_id)) for source in USAGE_SOURCES)


def set_quota(conn: apsw.Connection, name: str, quota_bytes: int | None) -> None:
    repo = by_name(conn, name)
    conn.execute("UPDATE repositories SET quota_bytes = ? WHERE id = ?", (quota_bytes, repo["id"]))


def list_all(conn: apsw.Connection) -> list[dict[str, Any]]:
    found = rows(conn, "SELECT * FROM repositories ORDER BY name")
    for repo in found:
        repo["used_bytes"] = used_bytes(conn, repo["id"])
    return found


def with_usage(conn: apsw.Connection, repository_ids: list[int]) -> list[dict[str, Any]]:
    return [r for r in list_all(conn) if r["id"] in repository_ids]
