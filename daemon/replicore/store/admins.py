"""Administrator accounts: names and salted scrypt password hashes."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import time
from typing import Any

import apsw

from ..errors import Conflict, NotFound, Unprocessable
from .db import row, rows

SCHEMA = """
CREATE TABLE admins (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at    REAL NOT NULL
) STRICT;
"""

# scrypt with n=2**14, r=8, p=1: about 16 MiB and tens of milliseconds per check.
_N, _R, _P = 2**14, 8, 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 8


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    encode = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${encode(salt).decode()}${encode(digest).decode()}"


def verify_password(stored: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    computed = hashlib.scrypt(
        password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32
    )
    return hmac.compare_digest(computed, base64.b64decode(digest))


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the name is unknown, so that timing does not reveal valid names
    (made on first use: every command imports this module)."""
    return hash_password("not-a-real-password")


def add(conn: apsw.Connection, name: str, password: str) -> None:
    if not NAME_PATTERN.match(name):
        raise Unprocessable("administrator name must be 1-64 of letters, digits, '._@-'")
    if len(password) < MIN_PASSWORD:
        raise Unprocessable(f"password must have at least {MIN_PASSWORD} characters")
    if row(conn, "SELECT name FROM admins WHERE name = ?", (name,)):
        raise Conflict(f"administrator {name!r} already exists")
    conn.execute(
        "INSERT INTO admins(name, password_hash, created_at) VALUES (?, ?, ?)",
        (name, hash_password(password), time.time()),
    )


def remove(conn: apsw.Connection, name: str) -> None:
    conn.execute("DELETE FROM admins WHERE name = ?", (name,))
    if conn.changes() == 0:
        raise NotFound(f"no administrator named {name!r}")


def list_all(conn: apsw.Connection) -> list[dict[str, Any]]:
    return rows(conn, "SELECT name, created_at FROM admins ORDER BY name")


def password_hash(conn: apsw.Connection, name: str) -> str | None:
    found = row(conn, "SELECT password_hash FROM admins WHERE name = ?", (name,))
    return None if found is None else str(found["password_hash"])


def check(conn: apsw.Connection, name: str, password: str) -> bool:
    """True when name/password is a valid administrator login (constant-ish time)."""
    stored = password_hash(conn, name)
    ok = verify_password(stored or _dummy_hash(), password)
    return ok and stored is not None
