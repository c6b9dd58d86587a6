"""Master cores: the sources that asked to pair or are paired, known by certificate fingerprint.

A row is one source identity (one client certificate). Its `state` moves:
unconfirmed (request received, key not yet proven) -> pending (synced with its certificate,
visible to the operator) -> approved | denied; demand pairing goes straight to approved;
unpairing moves an approved core to unpaired.
"""

from __future__ import annotations

from typing import Any

import apsw

from .db import row, rows

SCHEMA = """
CREATE TABLE master_cores (
    id              INTEGER PRIMARY KEY,
    core_id         TEXT NOT NULL,
    fingerprint     TEXT NOT NULL UNIQUE,
    certificate     TEXT NOT NULL,
    host_name       TEXT NOT NULL DEFAULT '',
    version         TEXT NOT NULL DEFAULT '',
    state           TEXT NOT NULL CHECK (state IN
                        ('unconfirmed', 'pending', 'approved', 'denied', 'unpaired')),
    method          TEXT NOT NULL CHECK (method IN ('request', 'demand')),
    customer_id     TEXT NOT NULL DEFAULT '',
    email           TEXT NOT NULL DEFAULT '',
    comment         TEXT NOT NULL DEFAULT '',
    reason          TEXT NOT NULL DEFAULT '',
    repository_id   INTEGER REFERENCES repositories(id),
    client_address  TEXT NOT NULL DEFAULT '',
    requested_at    REAL NOT NULL,
    confirmed_at    REAL,
    decided_at      REAL,
    decided_by      TEXT NOT NULL DEFAULT '',
    last_contact_at REAL,
    paused          INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX master_cores_core_id ON master_cores(core_id);
CREATE INDEX master_cores_state ON master_cores(state);
"""

#: States whose certificate is in the TLS trust store, so the source can reach pairing/sync.
TRUSTED_STATES = ("unconfirmed", "pending", "approved", "denied")


def by_fingerprint(conn: apsw.Connection, fingerprint: str) -> dict[str, Any] | None:
    return row(conn, "SELECT * FROM master_cores WHERE fingerprint = ?", (fingerprint,))


def trusted_certificates(conn: apsw.Connection) -> list[str]:
    """PEM certificates to load into the TLS trust store at start."""
    placeholders = ",".join("?" * len(TRUSTED_STATES))
    found = rows(
        conn,
        f"SELECT certificate FROM master_cores WHERE state IN ({placeholders})",
        TRUSTED_STATES,
    )
    return [r["certificate"] for r in found]
