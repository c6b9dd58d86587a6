"""File upload sessions: a source sends one file in chunks, the target checks its size and
MD5 at the end and hands it to the store its purpose names (Exchange DLLs).

Owns the `upload_sessions` table and the partial files `state_dir/uploads/<id>.part`.
Chunks go to a plain file, not to SQLite: a file of up to `uploads.max_file_bytes` would be
written twice through the WAL, hold the single writer for every chunk, and stay in the
database's pages after it is gone; a file is written once, fsynced, hashed by streaming,
moved into place without a copy, and unlinked to free its space at once.

The row's `received` is the truth: a chunk is written at that offset (the file is truncated
after it, so bytes written before a crash but never recorded are overwritten) and fsynced
before `received` grows, so a recorded byte is on disk and a retried chunk is never appended
twice. States: open -> completed | failed | cancelled | expired. Ended rows are kept for
`session_timeout` (a retried end is answered as before), then deleted by `expire()`.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Any

import apsw

from ..errors import (
    Conflict,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unprocessable,
)
from .db import row, rows

SCHEMA = """
CREATE TABLE upload_sessions (
    id          INTEGER PRIMARY KEY,
    session_id  TEXT NOT NULL UNIQUE,
    core_pk     INTEGER NOT NULL REFERENCES master_cores(id) ON DELETE CASCADE,
    file_name   TEXT NOT NULL,
    size        INTEGER NOT NULL CHECK (size >= 0),
    md5         TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    state       TEXT NOT NULL
                    CHECK (state IN ('open', 'completed', 'failed', 'cancelled', 'expired')),
    received    INTEGER NOT NULL DEFAULT 0 CHECK (received BETWEEN 0 AND size),
    error       TEXT NOT NULL DEFAULT '',
    result      TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    finished_at REAL
) STRICT;
CREATE INDEX upload_sessions_core ON upload_sessions(core_pk, state);
CREATE INDEX upload_sessions_state ON upload_sessions(state, updated_at);
"""

#: What an upload may be for, and so which store takes the file at the end.
PURPOSES = ("exchange-dll",)
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


def directory(state_dir: Path) -> Path:
    return state_dir / "uploads"


def part_path(state_dir: Path, session_id: str) -> Path:
    return directory(state_dir) / f"{session_id}.part"


def create(
    conn: apsw.Connection,
    core_pk: int,
    file_name: str,
    size: int,
    md5: str,
    purpose: str,
    now: float,
    *,
    max_bytes: int,
    max_open: int,
    disk_free: int,
) -> str:
    """Open a session for the caller; returns its id (a UUID). The file must be within the
    upload limit (413) and fit on the disk (507)."""
    if purpose not in PURPOSES:
        raise Unprocessable(f"purpose must be one of {', '.join(PURPOSES)}", field="purpose")
    if not _MD5.match(md5):
        raise Unprocessable("md5 must be 32 hexadecimal digits", field="md5")
    if size > max_bytes:
        raise PayloadTooLarge(
            f"a file of {size} bytes is over the upload limit of {max_bytes} bytes", field="size"
        )
    if size > disk_free:
        raise InsufficientStorage(f"{size} bytes do not fit in the {disk_free} bytes free")
    open_now = row(
        conn,
        "SELECT count(*) AS n FROM upload_sessions WHERE core_pk = ? AND state = 'open'",
        (core_pk,),
    )
    assert open_now is not None
    if open_now["n"] >= max_open:
        raise TooManyRequests(
            f"this source already has {open_now['n']} open upload sessions (the limit);"
            " end or cancel one first"
        )
    session_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO upload_sessions(session_id, core_pk, file_name, size, md5, purpose, state,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?)",
        (session_id, core_pk, file_name, size, md5.lower(), purpose, now, now),
    )
    return session_id


def get(conn: apsw.Connection, core_pk: int, session_id: str) -> dict[str, Any]:
    """The caller's session; 404 for an unknown one or another source's."""
    found = row(
        conn,
        "SELECT * FROM upload_sessions WHERE session_id = ? AND core_pk = ?",
        (session_id, core_pk),
    )
    if found is None:
        raise NotFound("no such upload session", field="uploadSessionId")
    return found


def require_open(session: dict[str, Any]) -> None:
    if session["state"] != "open":
        raise Conflict(
            f"the upload session is {session['state']}"
            + (f": {session['error']}" if session["error"] else ""),
            state=session["state"],
        )


def check_offset(session: dict[str, Any], offset: int) -> None:
    """409 naming the expected offset unless a chunk at `offset` is the next one."""
    if session["received"] != offset:
        raise Conflict(
            f"the upload is at byte {session['received']}, not {offset}",
            field="X-Upload-Offset",
            expectedOffset=session["received"],
        )


def write_chunk(path: Path, offset: int, data: bytes) -> None:
    """Write `data` at `offset`, drop anything after it, and fsync (runs in a thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.ftruncate(fd, offset + len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def record_chunk(
    conn: apsw.Connection, core_pk: int, session_id: str, offset: int, length: int, now: float
) -> int:
    """Count a written chunk; the session must still be open at `offset`. Returns the bytes
    received."""
    session = get(conn, core_pk, session_id)
    require_open(session)
    check_offset(session, offset)
    received = offset + length
    conn.execute(
        "UPDATE upload_sessions SET received = ?, updated_at = ? WHERE id = ?",
        (received, now, session["id"]),
    )
    return received


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    if path.exists():
        with path.open("rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
    return digest.hexdigest()


def finish(
    conn: apsw.Connection,
    core_pk: int,
    session_id: str,
    state: str,
    now: float,
    *,
    error: str = "",
    result: str | None = None,
) -> None:
    """End an open session (completed, failed or cancelled); `result` is the JSON answer of
    a completed one, repeated to a retried end."""
    assert state in ("completed", "failed", "cancelled")
    session = get(conn, core_pk, session_id)
    require_open(session)
    conn.execute(
        "UPDATE upload_sessions SET state = ?, error = ?, result = ?, updated_at = ?,"
        " finished_at = ? WHERE id = ?",
        (state, error, result, now, now, session["id"]),
    )


def expire(conn: apsw.Connection, now: float, timeout: float) -> list[str]:
    """Expire open sessions idle for `timeout` seconds and delete ended rows older than
    that; returns the ids of the sessions expired (their files are the caller's to remove)."""
    stale = [
        r["session_id"]
        for r in rows(
            conn,
            "SELECT session_id FROM upload_sessions WHERE state = 'open' AND updated_at < ?",
            (now - timeout,),
        )
    ]
    conn.execute(
        "UPDATE upload_sessions SET state = 'expired', error = ?, finished_at = ?"
        " WHERE state = 'open' AND updated_at < ?",
        (f"no data for {timeout:g} s", now, now - timeout),
    )
    conn.execute(
        "DELETE FROM upload_sessions WHERE state != 'open' AND finished_at < ?", (now - timeout,)
    )
    return stale


def open_ids(conn: apsw.Connection) -> set[str]:
    return {
        r["session_id"]
        for r in rows(conn, "SELECT session_id FROM upload_sessions WHERE state = 'open'")
    }


def remove_stray_parts(state_dir: Path, keep: set[str], older_than: float) -> int:
    """Delete partial files of sessions that are not open (left by a crash or a chunk that
    raced an expiry) and were last written before `older_than` (epoch seconds), so that the
    file of a session opened after `keep` was read is never touched."""
    removed = 0
    target = directory(state_dir)
    if not target.is_dir():
        return 0
    for path in target.glob("*.part"):
        try:
            stale = path.stat().st_mtime < older_than
        except FileNotFoundError:
            continue
        if path.stem not in keep and stale:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def for_core(conn: apsw.Connection, core_pk: int) -> list[dict[str, Any]]:
    return rows(
        conn, "SELECT * FROM upload_sessions WHERE core_pk = ? ORDER BY created_at", (core_pk,)
    )
