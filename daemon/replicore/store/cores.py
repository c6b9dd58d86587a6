"""Master cores: the sources that asked to pair or are paired, known by certificate fingerprint.

A row is one source identity (one client certificate); its id is the pairing request id the
operator sees. Its `state` moves:
unconfirmed (request received, key not yet proven) -> pending (synced with its certificate,
visible to the operator) -> approved | denied; demand pairing goes straight to approved;
unpairing moves an approved core to unpaired. A denied or unpaired certificate may request
again: the row starts over as unconfirmed and remembers its `previous_state`, which an
ignored or expired request returns to. A row is only ever deleted when none of its agents
was ever given a repository (so it holds no data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import apsw

from ..errors import Conflict, NotFound, ServiceUnavailable, Unprocessable
from . import agents, repositories
from .db import row, rows

SCHEMA = """
CREATE TABLE master_cores (
    id              INTEGER PRIMARY KEY,
    core_id         TEXT NOT NULL,
    fingerprint     TEXT NOT NULL UNIQUE,
    certificate     TEXT NOT NULL,
    host_name       TEXT NOT NULL DEFAULT '',
    version         TEXT NOT NULL DEFAULT '',
    api_version     TEXT NOT NULL DEFAULT '',
    replication_only_repository INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL CHECK (state IN
                        ('unconfirmed', 'pending', 'approved', 'denied', 'unpaired')),
    previous_state  TEXT NOT NULL DEFAULT '' CHECK (previous_state IN ('', 'denied', 'unpaired')),
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
    paused          INTEGER NOT NULL DEFAULT 0,
    unpaired_at     REAL,
    -- The source asked, when unpairing, that its agents' data be deleted (through the
    -- recycle bin, which acts on this flag).
    delete_data_requested INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX master_cores_core_id ON master_cores(core_id);
CREATE INDEX master_cores_state ON master_cores(state);
"""

#: States whose certificate is in the TLS trust store, so the source can reach pairing/sync
#: (an unpaired source learns it is unpaired there, and gets 403 on everything else).
TRUSTED_STATES = ("unconfirmed", "pending", "approved", "denied", "unpaired")
#: Requests not decided yet; they count against the cap on pending requests.
OPEN_STATES = ("unconfirmed", "pending")

#: How a pairing state is named to sources (`state`, after the original's `Established`).
STATE_NAMES = {
    "unconfirmed": "Unconfirmed",
    "pending": "Pending",
    "approved": "Established",
    "denied": "Denied",
    "unpaired": "Unpaired",
}


@dataclass(frozen=True)
class SourceInfo:
    """What a source says about itself when it asks to pair (`masterCoreInfo` and the rest)."""

    core_id: str
    host_name: str = ""
    version: str = ""
    api_version: str = ""
    replication_only_repository: bool = False
    customer_id: str = ""
    email: str = ""
    comment: str = ""


def by_fingerprint(conn: apsw.Connection, fingerprint: str) -> dict[str, Any] | None:
    return row(conn, "SELECT * FROM master_cores WHERE fingerprint = ?", (fingerprint,))


def get(conn: apsw.Connection, core_pk: int) -> dict[str, Any]:
    found = row(conn, "SELECT * FROM master_cores WHERE id = ?", (core_pk,))
    if found is None:
        raise NotFound(f"no pairing request {core_pk}", field="requestId")
    return found


def trusted_certificates(conn: apsw.Connection) -> list[str]:
    """PEM certificates to load into the TLS trust store at start."""
    placeholders = ",".join("?" * len(TRUSTED_STATES))
    found = rows(
        conn,
        f"SELECT certificate FROM master_cores WHERE state IN ({placeholders})",
        TRUSTED_STATES,
    )
    return [r["certificate"] for r in found]


def _drop_request(conn: apsw.Connection, core: dict[str, Any]) -> None:
    """Forget an undecided request: back to its previous state, or gone if it had none."""
    agents.drop_unapproved(conn, core["id"])
    if core["previous_state"] or agents.has_data_rows(conn, core["id"]):
        conn.execute(
            "UPDATE master_cores SET state = ?, previous_state = '' WHERE id = ?",
            (core["previous_state"] or "unpaired", core["id"]),
        )
    else:
        conn.execute("DELETE FROM master_cores WHERE id = ?", (core["id"],))


def purge_expired(conn: apsw.Connection, now: float, ttl: float) -> int:
    """Drop unconfirmed requests older than ttl seconds; returns how many."""
    expired = rows(
        conn,
        "SELECT * FROM master_cores WHERE state = 'unconfirmed' AND requested_at < ?",
        (now - ttl,),
    )
    for core in expired:
        _drop_request(conn, core)
    return len(expired)


def open_count(conn: apsw.Connection) -> int:
    found = row(
        conn, "SELECT count(*) AS n FROM master_cores WHERE state IN ('unconfirmed', 'pending')"
    )
    return int(found["n"]) if found else 0


def submit_request(
    conn: apsw.Connection,
    *,
    fingerprint: str,
    certificate: str,
    info: SourceInfo,
    wanted: list[agents.AgentRequest],
    client_address: str,
    now: float,
    ttl: float,
    max_pending: int,
) -> dict[str, Any]:
    """Store a pairing request as unconfirmed; returns the row.

    Conflict when the certificate already has an open request or is paired;
    ServiceUnavailable when `max_pending` requests are already open."""
    purge_expired(conn, now, ttl)
    existing = by_fingerprint(conn, fingerprint)
    if existing is not None and existing["state"] not in ("denied", "unpaired"):
        raise Conflict(
            f"this certificate already has a pairing in state {existing['state']}",
            field="pairingRequest.clientCertificate",
            state=existing["state"],
        )
    if open_count(conn) >= max_pending:
        raise ServiceUnavailable(
            f"this core already holds {max_pending} pairing requests awaiting a decision; "
            "try again later"
        )
    values = (
        info.core_id,
        certificate,
        info.host_name,
        info.version,
        info.api_version,
        int(info.replication_only_repository),
        info.customer_id,
        info.email,
        info.comment,
        client_address,
        now,
    )
    if existing is None:
        conn.execute(
            "INSERT INTO master_cores(core_id, certificate, host_name, version, api_version,"
            " replication_only_repository, customer_id, email, comment, client_address,"
            " requested_at, fingerprint, state, method)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'unconfirmed', 'request')",
            (*values, fingerprint),
        )
        core_pk = conn.last_insert_rowid()
    else:
        core_pk = existing["id"]
        conn.execute(
            "UPDATE master_cores SET core_id = ?, certificate = ?, host_name = ?, version = ?,"
            " api_version = ?, replication_only_repository = ?, customer_id = ?, email = ?,"
            " comment = ?, client_address = ?, requested_at = ?, previous_state = state,"
            " state = 'unconfirmed', method = 'request', reason = '', confirmed_at = NULL,"
            " decided_at = NULL, decided_by = '' WHERE id = ?",
            (*values, core_pk),
        )
    agents.request(conn, core_pk, wanted)
    return get(conn, core_pk)


def confirm(conn: apsw.Connection, core_pk: int, now: float, ttl: float) -> dict[str, Any] | None:
    """A source synced with its certificate: an unconfirmed request becomes pending (the
    operator sees it from now on). Records the contact. None when the request had expired
    (it is dropped)."""
    core = get(conn, core_pk)
    if core["state"] == "unconfirmed":
        if core["requested_at"] < now - ttl:
            _drop_request(conn, core)
            return None
        conn.execute(
            "UPDATE master_cores SET state = 'pending', confirmed_at = ? WHERE id = ?",
            (now, core_pk),
        )
    conn.execute("UPDATE master_cores SET last_contact_at = ? WHERE id = ?", (now, core_pk))
    return get(conn, core_pk)


def _own_repository(conn: apsw.Connection, core: dict[str, Any]) -> int:
    """The repository a source gets when nobody names one: the one it was given before, or a
    new one of its own (so deduplication never crosses sources by default)."""
    if core["repository_id"] is not None:
        found = row(conn, "SELECT id FROM repositories WHERE id = ?", (core["repository_id"],))
        if found is not None:
            return int(found["id"])
    base = f"source-{core['host_name'] or core['core_id']}"
    return repositories.create_unique(conn, base)


def _decide_approved(
    conn: apsw.Connection,
    core: dict[str, Any],
    *,
    repository: str | None,
    agent_repositories: dict[str, str],
    decided_by: str,
    now: float,
    field: str,
    repository_field: str,
) -> None:
    if repository is not None:
        try:
            default = int(repositories.by_name(conn, repository)["id"])
        except NotFound:
            raise Unprocessable(
                f"no repository named {repository!r}", field=repository_field
            ) from None
    else:
        default = _own_repository(conn, core)
    per_agent: dict[str, int] = {}
    for agent_id, name in agent_repositories.items():
        try:
            per_agent[agent_id] = int(repositories.by_name(conn, name)["id"])
        except NotFound:
            raise Unprocessable(
                f"no repository named {name!r} (for agent {agent_id!r})", field=field
            ) from None
    agents.approve_pending(conn, core["id"], default, per_agent, field)
    conn.execute(
        "UPDATE master_cores SET state = 'approved', previous_state = '', reason = '',"
        " repository_id = ?, decided_at = ?, decided_by = ?, unpaired_at = NULL,"
        " delete_data_requested = 0 WHERE id = ?",
        (default, now, decided_by, core["id"]),
    )


def demand(
    conn: apsw.Connection,
    *,
    fingerprint: str,
    certificate: str,
    info: SourceInfo,
    wanted: list[agents.AgentRequest],
    repository: str | None,
    client_address: str,
    decided_by: str,
    now: float,
) -> dict[str, Any]:
    """Pair at once on an administrator's word: the core is approved, its agents too (into
    the named repository, each agent's own choice, or the source's own repository)."""
    existing = by_fingerprint(conn, fingerprint)
    values = (
        info.core_id,
        certificate,
        info.host_name,
        info.version,
        info.api_version,
        int(info.replication_only_repository),
        info.customer_id,
        info.email,
        info.comment,
        client_address,
    )
    if existing is None:
        conn.execute(
            "INSERT INTO master_cores(core_id, certificate, host_name, version, api_version,"
            " replication_only_repository, customer_id, email, comment, client_address,"
            " requested_at, confirmed_at, fingerprint, state, method)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 'demand')",
            (*values, now, now, fingerprint),
        )
        core_pk = conn.last_insert_rowid()
    else:
        core_pk = existing["id"]
        conn.execute(
            "UPDATE master_cores SET core_id = ?, certificate = ?, host_name = ?, version = ?,"
            " api_version = ?, replication_only_repository = ?, customer_id = ?, email = ?,"
            " comment = ?, client_address = ?, method = 'demand', confirmed_at = ?"
            " WHERE id = ?",
            (*values, now, core_pk),
        )
    agents.request(conn, core_pk, wanted)
    _decide_approved(
        conn,
        get(conn, core_pk),
        repository=repository,
        agent_repositories={a.agent_id: a.repository for a in wanted if a.repository},
        decided_by=decided_by,
        now=now,
        field="agents",
        repository_field="repositoryName",
    )
    return get(conn, core_pk)


def _open_request(conn: apsw.Connection, core_pk: int, *allowed: str) -> dict[str, Any]:
    core = get(conn, core_pk)
    if core["state"] not in allowed:
        if core["state"] == "unconfirmed":
            raise Conflict(
                f"request {core_pk} is not confirmed yet: the source has not synced with its "
                "certificate",
                state=core["state"],
            )
        raise Conflict(f"request {core_pk} is {core['state']}, not pending", state=core["state"])
    return core


def approve(
    conn: apsw.Connection,
    core_pk: int,
    *,
    repository: str | None = None,
    agent_repositories: dict[str, str] | None = None,
    customer_id: str | None = None,
    email: str | None = None,
    comment: str | None = None,
    decided_by: str = "",
    now: float,
) -> dict[str, Any]:
    """The operator approves a confirmed request (see `_own_repository` for the default)."""
    core = _open_request(conn, core_pk, "pending")
    for column, value in (("customer_id", customer_id), ("email", email), ("comment", comment)):
        if value is not None:
            conn.execute(f"UPDATE master_cores SET {column} = ? WHERE id = ?", (value, core_pk))
    _decide_approved(
        conn,
        core,
        repository=repository,
        agent_repositories=agent_repositories or {},
        decided_by=decided_by,
        now=now,
        field="agentRepository",
        repository_field="repository",
    )
    return get(conn, core_pk)


def deny(
    conn: apsw.Connection, core_pk: int, *, reason: str, decided_by: str = "", now: float
) -> dict[str, Any]:
    """The operator denies a request; the source learns the reason at its next sync."""
    _open_request(conn, core_pk, "pending", "unconfirmed")
    agents.deny_pending(conn, core_pk)
    conn.execute(
        "UPDATE master_cores SET state = 'denied', previous_state = '', reason = ?,"
        " decided_at = ?, decided_by = ? WHERE id = ?",
        (reason, now, decided_by, core_pk),
    )
    return get(conn, core_pk)


def ignore(conn: apsw.Connection, core_pk: int) -> None:
    """The operator drops a request without an answer (the source keeps seeing it pending
    until its certificate is refused as unknown)."""
    _drop_request(conn, _open_request(conn, core_pk, "pending", "unconfirmed"))


def unpair(
    conn: apsw.Connection, core_pk: int, *, delete_recovery_points: bool, now: float
) -> dict[str, Any]:
    """The source ends its pairing. Its agents and their data stay (with
    `delete_recovery_points` the request to delete them is recorded for the recycle bin)."""
    conn.execute(
        "UPDATE master_cores SET state = 'unpaired', unpaired_at = ?,"
        " delete_data_requested = ? WHERE id = ? AND state = 'approved'",
        (now, int(delete_recovery_points), core_pk),
    )
    if conn.changes() == 0:
        raise Conflict("this source is not paired")
    return get(conn, core_pk)


def list_requests(conn: apsw.Connection, *, include_all: bool = False) -> list[dict[str, Any]]:
    """Pairing requests for the operator: the confirmed, undecided ones, or every row."""
    where = "" if include_all else "WHERE state = 'pending'"
    found = rows(conn, f"SELECT * FROM master_cores {where} ORDER BY id")
    for core in found:
        core["agents"] = agents.with_repositories(conn, core["id"])
    return found


def describe(conn: apsw.Connection, core: dict[str, Any], target_core_id: str) -> dict[str, Any]:
    """The pairing as its own source sees it (the answer of pairing/sync and demand)."""
    core_paused = bool(core["paused"])
    return {
        "requestId": core["id"],
        "coreId": target_core_id,
        "state": STATE_NAMES[core["state"]],
        "pairingState": core["state"],
        "method": core["method"],
        "wasRequested": core["method"] == "request",
        "isReachable": True,
        "isReplicationPaused": core_paused,
        "errorDetails": core["reason"] if core["state"] == "denied" else None,
        "customerId": core["customer_id"],
        "emailAddress": core["email"],
        "comments": core["comment"],
        "agents": [
            agents.describe(a, core_paused) for a in agents.with_repositories(conn, core["id"])
        ],
    }


def describe_master(conn: apsw.Connection, core: dict[str, Any]) -> dict[str, Any]:
    """A source as an administrator sees it (`cores/masters`, `pairing list --json`)."""
    return {
        "requestId": core["id"],
        "masterCoreInfo": {
            "id": core["core_id"],
            "hostName": core["host_name"],
            "version": core["version"],
            "apiVersion": core["api_version"],
            "isReplicationOnlyRepositorySupported": bool(core["replication_only_repository"]),
        },
        "fingerprint": core["fingerprint"],
        "state": core["state"],
        "method": core["method"],
        "customerId": core["customer_id"],
        "emailAddress": core["email"],
        "comments": core["comment"],
        "reason": core["reason"],
        "clientAddress": core["client_address"],
        "requestedAt": core["requested_at"],
        "confirmedAt": core["confirmed_at"],
        "decidedAt": core["decided_at"],
        "decidedBy": core["decided_by"],
        "lastContactAt": core["last_contact_at"],
        "unpairedAt": core["unpaired_at"],
        "deleteRecoveryPointsRequested": bool(core["delete_data_requested"]),
        "isReplicationPaused": bool(core["paused"]),
        "agents": [
            {
                **agents.describe(a, bool(core["paused"])),
                "repositoryName": a.get("repository_name"),
                "repositoryId": a["repository_id"],
            }
            for a in agents.with_repositories(conn, core["id"])
        ],
    }


def masters(conn: apsw.Connection, *, include_all: bool = False) -> list[dict[str, Any]]:
    """The paired sources (every source on record with include_all)."""
    where = "" if include_all else "WHERE state = 'approved'"
    found = rows(conn, f"SELECT * FROM master_cores {where} ORDER BY id")
    return [describe_master(conn, core) for core in found]
