"""Bad input on every pairing endpoint: malformed JSON (400), missing fields, wrong types and
bad values (422 naming the field), oversized bodies (413), and a database left exactly as it
was after each refusal."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx

from pairing_helpers import db_snapshot, pair_by_demand, pairing_body
from replicore import certs

BIG = 2 * 1024 * 1024


def _server_certificate() -> str:
    return certs.make_self_signed("not a client", server=True)[0].decode()


def _with(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of body with the dotted path set to value (or removed when value is ...)."""
    changed = copy.deepcopy(body)
    *parents, last = path.split(".")
    node: Any = changed
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return changed


def _chunks(size: int) -> Iterator[bytes]:
    sent = 0
    while sent < size:
        yield b" " * 65536
        sent += 65536


def pairing_cases(body: dict[str, Any]) -> list[tuple[str, dict[str, Any], int, str | None]]:
    """(label, request kwargs, status, field) for the bodies of pairing/request and demand."""
    agent = body["agents"][0]
    return [
        ("malformed", {"content": b'{"pairingRequest": '}, 400, None),
        ("empty", {"content": b""}, 400, None),
        ("not an object", {"json": [body]}, 422, None),
        ("no pairingRequest", {"json": _with(body, "pairingRequest", ...)}, 422, "pairingRequest"),
        (
            "no certificate",
            {"json": _with(body, "pairingRequest.clientCertificate", ...)},
            422,
            "pairingRequest.clientCertificate",
        ),
        (
            "no core id",
            {"json": _with(body, "pairingRequest.masterCoreInfo.id", ...)},
            422,
            "pairingRequest.masterCoreInfo.id",
        ),
        (
            "bool as string",
            {
                "json": _with(
                    body, "pairingRequest.masterCoreInfo.isReplicationOnlyRepositorySupported", "y"
                )
            },
            422,
            "pairingRequest.masterCoreInfo.isReplicationOnlyRepositorySupported",
        ),
        ("agents not a list", {"json": _with(body, "agents", "web01")}, 422, "agents"),
        ("customer id a number", {"json": _with(body, "customerId", 5)}, 422, "customerId"),
        ("bad e-mail", {"json": _with(body, "emailAddress", "nobody")}, 422, "emailAddress"),
        (
            "bad agent id",
            {"json": _with(body, "agents.0.agentInfo.id", "../etc")},
            422,
            "agents[0].agentInfo.id",
        ),
        (
            "agent twice",
            {"json": _with(body, "agents", [agent, agent])},
            422,
            "agents[1].agentInfo.id",
        ),
        ("too many agents", {"json": _with(body, "agents", [agent] * 1001)}, 422, "agents"),
        (
            "not a certificate",
            {"json": _with(body, "pairingRequest.clientCertificate", "hello")},
            422,
            "pairingRequest.clientCertificate",
        ),
        (
            "a server certificate",
            {"json": _with(body, "pairingRequest.clientCertificate", _server_certificate())},
            422,
            "pairingRequest.clientCertificate",
        ),
        (
            "another API version",
            {"json": _with(body, "pairingRequest.masterCoreInfo.apiVersion", "9.0")},
            422,
            "pairingRequest.masterCoreInfo.apiVersion",
        ),
        (
            "oversized",
            {"content": b" " * BIG, "headers": {"Content-Type": "application/json"}},
            413,
            None,
        ),
        ("oversized, chunked", {"content": _chunks(BIG)}, 413, None),
    ]


def assert_refused(
    server: Any,
    client: httpx.Client,
    method: str,
    path: str,
    cases: list[tuple[str, dict[str, Any], int, str | None]],
    **common: Any,
) -> None:
    before = db_snapshot(server)
    for label, kwargs, status, field in cases:
        response = client.request(method, path, **kwargs, **common)
        assert response.status_code == status, (label, response.text)
        answer = response.json()
        assert answer["message"], label
        if field is not None:
            assert answer.get("field") == field, (label, answer)
        assert db_snapshot(server) == before, label


def test_pairing_request_refuses_bad_input_and_changes_nothing(server, make_source):
    body = pairing_body(make_source("a"), ["web01"])
    with server.client() as client:
        assert_refused(server, client, "POST", "slave/pairing/request", pairing_cases(body))
        assert client.post("slave/pairing/request", json=body).status_code == 202


def test_pairing_demand_refuses_bad_input_and_changes_nothing(server, admin, make_source):
    assert server.cli("repository", "create", "tenant").status == 0
    body = pairing_body(make_source("a"), ["web01"])
    cases = [
        *pairing_cases(body),
        (
            "bad repository name",
            {"json": {**body, "repositoryName": "../x"}},
            422,
            "repositoryName",
        ),
        ("unknown repository", {"json": {**body, "repositoryName": "nope"}}, 422, "repositoryName"),
        (
            "repository a number",
            {"json": {**body, "repositoryName": 3}},
            422,
            "repositoryName",
        ),
        (
            "unknown agent repository",
            {"json": _with(body, "agents.0.repositoryName", "nope")},
            422,
            "agents",
        ),
    ]
    with server.client() as client:
        assert_refused(server, client, "POST", "slave/pairing/demand", cases, auth=admin)
        # Authorization runs before the body is read: no credentials, no parsing.
        assert_refused(
            server,
            client,
            "POST",
            "slave/pairing/demand",
            [("anonymous, malformed", {"content": b"{"}, 401, None)],
        )
        good = client.post(
            "slave/pairing/demand",
            json=_with(body, "agents.0.repositoryName", "tenant"),
            auth=admin,
        )
    assert good.status_code == 200 and good.json()["agents"][0]["repositoryName"] == "tenant"


def test_replication_verify_start_refuses_bad_input(server, make_source):
    info = pairing_body(make_source("a"), [])["pairingRequest"]["masterCoreInfo"]
    body = {"masterCoreInfo": info}
    cases = [
        ("malformed", {"content": b'{"masterCoreInfo": '}, 400, None),
        ("no masterCoreInfo", {"json": {}}, 422, "masterCoreInfo"),
        (
            "core id a list",
            {"json": _with(body, "masterCoreInfo.id", [])},
            422,
            "masterCoreInfo.id",
        ),
        (
            "certificate a number",
            {"json": {**body, "clientCertificate": 1}},
            422,
            "clientCertificate",
        ),
        ("oversized", {"content": b" " * BIG}, 413, None),
        ("bad flag", {"json": body, "params": {"useCredentials": "maybe"}}, 422, "useCredentials"),
    ]
    with server.client() as client:
        assert_refused(server, client, "POST", "slave/replication/verifyStart/", cases)


def test_agent_verify_start_answers_404_for_an_impossible_agent_id(server, admin, make_source):
    source = make_source("a")
    pair_by_demand(server, source, ["web01"], admin)
    with server.client(source) as client:
        for agent_id in ("a%20b", "x" * 200, "web01%00"):
            response = client.get(f"slave/agents/{agent_id}/replication/verifyStart")
            assert response.status_code == 404 and response.json()["message"], agent_id


def test_query_flags_must_be_true_or_false(server, admin, make_source):
    source = make_source("a")
    pair_by_demand(server, source, ["web01"], admin)
    with server.client() as client:
        masters = client.get("slave/cores/masters", params={"all": "maybe"}, auth=admin)
    with server.client(source) as client:
        assert_refused(
            server,
            client,
            "DELETE",
            "slave/pairing",
            [("bad flag", {"params": {"deleteRecoveryPoints": "2"}}, 422, "deleteRecoveryPoints")],
        )
    assert masters.status_code == 422 and masters.json()["field"] == "all"
