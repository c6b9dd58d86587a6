"""Logins to the web console: one row per session, known only by the SHA-256 of its token.

Owns `console_sessions`. The browser holds the token (a random cookie value); this table holds
its hash, the administrator it belongs to, and its times. A session is valid until
`expires_at` (its absolute lifetime, `console.session_ttl`) and while it has been used within
the idle timeout (`console.idle_timeout`). Removing an administrator ends their sessions
(foreign key, ON DELETE CASCADE). Expired rows are deleted whenever someone logs in.
"""

from __future__ import annotations

from typing import Any

import apsw

from .db import row

SCHEMA = """
CREATE TABLE console_sessions (
    id             INTEGER PRIMARY KEY,
    token_hash     BLOB NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    admin_name     TEXT NOT NULL REFERENCES admins(name) ON DELETE CASCADE,
    client_address TEXT NOT NULL DEFAULT '',
    user_agent     TEXT NOT NULL DEFAULT '',
    created_at     REAL NOT NULL,
    last_seen_at   REAL NOT NULL,
    expires_at     REAL NOT NULL
) STRICT;
CREATE INDEX console_sessions_admin ON console_sessions(admin_name);
"""

#: Longest user agent kept (it is only shown to the operator).
MAX_USER_AGENT = 256


def create(
    conn: apsw.Connection,
    token_hash: bytes,
    admin_name: str,
    *,
    client_address: str,
    user_agent: str,
    now: float,
    ttl: float,
    idle_timeout: float,
) -> int:
    """Start a session for `admin_name` (who must exist); returns its id. Deletes the expired
    sessions of every administrator first."""
    purge_expired(conn, now, idle_timeout)
    conn.execute(
        "INSERT INTO console_sessions(token_hash, admin_name, client_address, user_agent,"
        " created_at, last_seen_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            token_hash,
            admin_name,
            client_address[:256],
            user_agent[:MAX_USER_AGENT],
            now,
            now,
            now + ttl,
        ),
    )
    return conn.last_insert_rowid()


def find(
    conn: apsw.Connection, token_hash: bytes, now: float, idle_timeout: float
) -> dict[str, Any] | None:
    """The valid session of this token hash, or None (unknown, expired or idle too long)."""
    return row(
        conn,
        "SELECT * FROM console_sessions WHERE token_hash = ? AND expires_at > ?"
        " AND last_seen_at > ?",
        (token_hash, now, now - idle_timeout),
    )


def touch(conn: apsw.Connection, session_id: int, now: float) -> None:
    """Note that the session was used now (restarts its idle timeout)."""
    conn.execute(
        "UPDATE console_sessions SET last_seen_at = max(last_seen_at, ?) WHERE id = ?",
        (now, session_id),
    )


def end(conn: apsw.Connection, token_hash: bytes) -> dict[str, Any] | None:
    """Delete the session of this token hash (logout); the row it was, or None."""
    found = row(conn, "SELECT * FROM console_sessions WHERE token_hash = ?", (token_hash,))
    if found is not None:
        conn.execute("DELETE FROM console_sessions WHERE id = ?", (found["id"],))
    return found


def purge_expired(conn: apsw.Connection, now: float, idle_timeout: float) -> int:
    """Delete the sessions past their lifetime or idle too long; how many."""
    conn.execute(
        "DELETE FROM console_sessions WHERE expires_at <= ? OR last_seen_at <= ?",
        (now, now - idle_timeout),
    )
    return conn.changes()


def active_count(conn: apsw.Connection, now: float, idle_timeout: float) -> int:
    found = conn.execute(
        "SELECT count(*) FROM console_sessions WHERE expires_at > ? AND last_seen_at > ?",
        (now, now - idle_timeout),
    ).fetchone()
    return int(found[0])
