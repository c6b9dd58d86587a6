"""Test helpers for pairing sources with a running server, shared by every area's tests.

`pair_by_demand` pairs a source at once (administrator credentials); `pair_by_request`
goes the operator's way (request, sync, `replicore pairing approve`). Both record the target
in the source's identity as `replicore source pair` does, so `server.client(source)` and the
source commands work afterwards. `db_snapshot` dumps every table, to show that a rejected
request changed nothing.
"""

from __future__ import annotations

from typing import Any

import apsw

from replicore import API_VERSION
from replicore.source import identity


def pairing_body(
    source: identity.Identity,
    agents: list[str],
    *,
    customer_id: str = "",
    email: str = "",
    comments: str = "",
) -> dict[str, Any]:
    """The body of pairing/request (and, with repositoryName added, of pairing/demand)."""
    return {
        "pairingRequest": {
            "clientCertificate": source.certificate_pem,
            "masterCoreInfo": {
                "id": source.core_id,
                "hostName": source.host_name,
                "version": "test",
                "apiVersion": API_VERSION,
                "isReplicationOnlyRepositorySupported": False,
            },
        },
        "customerId": customer_id,
        "emailAddress": email,
        "comments": comments,
        "agents": [
            {"agentInfo": {"id": a, "displayName": a, "hostName": f"{a}.example"}} for a in agents
        ],
    }


def save_target(server: Any, source: identity.Identity, answer: dict[str, Any]) -> None:
    source.save_target(
        {
            "url": server.url,
            "coreId": server.core_id,
            "certificate": server.pem,
            "fingerprint": server.fingerprint,
            "requestId": answer.get("requestId"),
            "method": answer.get("method", "request"),
        }
    )


def pair_by_demand(
    server: Any,
    source: identity.Identity,
    agents: list[str],
    admin: tuple[str, str],
    repository: str | None = None,
) -> dict[str, Any]:
    """Pair `source` with `server` by demand, approving `agents` (into `repository`, or a new
    repository of the source's own). Returns the answer: the pairing as the source sees it,
    with `agents[i]["agentInfo"]["id"]`, `["state"] == "approved"` and `["repositoryName"]`."""
    body = pairing_body(source, agents)
    if repository is not None:
        body["repositoryName"] = repository
    with server.client() as client:
        response = client.post("slave/pairing/demand", json=body, auth=admin)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["state"] == "Established", answer
    save_target(server, source, answer)
    return answer


def request_pairing(server: Any, source: identity.Identity, agents: list[str]) -> dict[str, Any]:
    """Ask to pair (anonymous) and confirm with a sync; returns the sync answer (pending)."""
    with server.client() as client:
        response = client.post("slave/pairing/request", json=pairing_body(source, agents))
    assert response.status_code == 202, response.text
    with server.client(source) as client:
        synced = client.post("slave/pairing/sync")
    assert synced.status_code == 200, synced.text
    answer: dict[str, Any] = synced.json()
    assert answer["pairingState"] == "pending", answer
    return answer


def pair_by_request(
    server: Any, source: identity.Identity, agents: list[str], *approve_args: str
) -> dict[str, Any]:
    """Request, confirm, approve with `replicore pairing approve ID *approve_args`; returns
    the sync answer after approval."""
    pending = request_pairing(server, source, agents)
    result = server.cli("pairing", "approve", str(pending["requestId"]), *approve_args)
    assert result.status == 0, result.stderr
    with server.client(source) as client:
        answer: dict[str, Any] = client.post("slave/pairing/sync").json()
    assert answer["state"] == "Established", answer
    save_target(server, source, answer)
    return answer


def db_snapshot(server: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the server's database (for before/after comparisons), but
    the audit log, which rightly records refused administrator logins."""
    conn = apsw.Connection(str(server.database_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' AND name != 'audit_log' ORDER BY name"
            )
        ]
        return {
            t: sorted(map(tuple, conn.execute(f'SELECT * FROM "{t}"')), key=repr) for t in tables
        }
    finally:
        conn.close()
