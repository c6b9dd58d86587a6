"""Pairing against a real server: by request (confirmed by a sync with the source's own
certificate, then decided by the operator's commands) and by demand (administrator
credentials); what a paired source may then see, and what it may not."""

from __future__ import annotations

import json

import apsw

from pairing_helpers import (
    db_snapshot,
    pair_by_demand,
    pair_by_request,
    pairing_body,
    request_pairing,
)
from replicore import API_VERSION


def _list(server, *args: str) -> list[dict]:
    result = server.cli("pairing", "list", "--json", *args)
    assert result.status == 0, result.stderr
    return json.loads(result.stdout)


def test_request_is_hidden_from_the_operator_until_the_source_syncs(server, make_source):
    source = make_source("a")
    with server.client() as client:
        response = client.post(
            "slave/pairing/request",
            json=pairing_body(
                source, ["web01", "db01"], customer_id="C-7", email="ops@a.example", comments="hi"
            ),
        )
    assert response.status_code == 202, response.text
    assert response.json()["pairingState"] == "unconfirmed"
    assert response.json()["clientCertificateFingerprint"] == source.fingerprint
    assert _list(server) == []
    assert [r["state"] for r in _list(server, "--all")] == ["unconfirmed"]

    with server.client(source) as client:
        synced = client.post("slave/pairing/sync")
    assert synced.status_code == 200
    assert synced.json()["state"] == "Pending" and synced.json()["wasRequested"] is True

    [listed] = _list(server)
    assert listed["requestId"] == response.json()["requestId"]
    assert listed["masterCoreInfo"]["id"] == source.core_id
    assert listed["fingerprint"] == source.fingerprint
    assert (listed["customerId"], listed["emailAddress"], listed["comments"]) == (
        "C-7",
        "ops@a.example",
        "hi",
    )
    assert sorted(a["agentInfo"]["id"] for a in listed["agents"]) == ["db01", "web01"]
    table = server.cli("pairing", "list")
    assert source.fingerprint in table.stdout and "db01,web01" in table.stdout


def test_approved_request_syncs_as_established_with_its_repository(server, make_source):
    source = make_source("a")
    pending = request_pairing(server, source, ["web01"])
    result = server.cli(
        "pairing", "approve", str(pending["requestId"]), "--customer-id", "C-1", "--comment", "ok"
    )
    assert result.status == 0, result.stderr
    with server.client(source) as client:
        answer = client.post("slave/pairing/sync").json()
        repos = client.get("slave/repositories")
    assert answer["state"] == "Established" and answer["pairingState"] == "approved"
    assert answer["customerId"] == "C-1" and answer["comments"] == "ok"
    [agent] = answer["agents"]
    assert agent["state"] == "approved" and agent["repositoryName"].startswith("source-")
    assert repos.status_code == 200
    [repo] = repos.json()["repositories"]
    assert repo["name"] == agent["repositoryName"] and repo["agents"] == ["web01"]
    assert repo["quotaBytes"] is None and repo["usedBytes"] == 0
    assert repo["freeBytes"] > 0 and repo["sizeBytes"] == repo["freeBytes"]


def test_approve_refuses_a_request_not_confirmed_yet(server, make_source):
    source = make_source("a")
    with server.client() as client:
        request_id = client.post(
            "slave/pairing/request", json=pairing_body(source, ["web01"])
        ).json()["requestId"]
    before = db_snapshot(server)
    result = server.cli("pairing", "approve", str(request_id))
    assert result.status == 1 and "not confirmed" in result.stderr
    assert db_snapshot(server) == before


def test_approve_puts_agents_into_named_repositories(server, make_source):
    assert server.cli("repository", "create", "shared", "--quota", "1G").status == 0
    assert server.cli("repository", "create", "special").status == 0
    source = make_source("a")
    pending = request_pairing(server, source, ["web01", "db01"])
    request_id = str(pending["requestId"])

    before = db_snapshot(server)
    missing = server.cli("pairing", "approve", request_id, "--repository", "nope")
    stranger = server.cli("pairing", "approve", request_id, "--agent-repository", "zz=special")
    assert missing.status == 1 and "nope" in missing.stderr
    assert stranger.status == 1 and "zz" in stranger.stderr
    assert db_snapshot(server) == before

    result = server.cli(
        "pairing",
        "approve",
        request_id,
        "--repository",
        "shared",
        "--agent-repository",
        "db01=special",
    )
    assert result.status == 0, result.stderr
    with server.client(source) as client:
        agents = {
            a["agentInfo"]["id"]: a for a in client.post("slave/pairing/sync").json()["agents"]
        }
        repos = {r["name"]: r for r in client.get("slave/repositories").json()["repositories"]}
    assert agents["web01"]["repositoryName"] == "shared"
    assert agents["db01"]["repositoryName"] == "special"
    assert repos["shared"]["quotaBytes"] == 1024**3 and repos["shared"]["isDefault"] is True
    assert repos["shared"]["sizeBytes"] == 1024**3
    assert repos["special"]["agents"] == ["db01"]


def test_denied_request_syncs_with_the_reason(server, make_source):
    source = make_source("a")
    pending = request_pairing(server, source, ["web01"])
    result = server.cli("pairing", "deny", str(pending["requestId"]), "--reason", "no contract")
    assert result.status == 0, result.stderr
    with server.client(source) as client:
        answer = client.post("slave/pairing/sync").json()
    assert answer["state"] == "Denied" and answer["errorDetails"] == "no contract"
    assert answer["agents"][0]["state"] == "denied"
    assert answer["agents"][0]["repositoryName"] is None
    again = server.cli("pairing", "approve", str(pending["requestId"]))
    assert again.status == 1 and "denied" in again.stderr


def test_ignored_request_is_dropped(server, make_source):
    source = make_source("a")
    pending = request_pairing(server, source, ["web01"])
    result = server.cli("pairing", "ignore", str(pending["requestId"]))
    assert result.status == 0, result.stderr
    assert _list(server, "--all") == []
    with server.client(source) as client:
        assert client.post("slave/pairing/sync").status_code == 401


def test_rerequest_conflicts_while_open_and_starts_over_after_a_denial(server, make_source):
    source = make_source("a")
    pending = request_pairing(server, source, ["web01"])
    with server.client() as client:
        conflict = client.post("slave/pairing/request", json=pairing_body(source, ["web01"]))
    assert conflict.status_code == 409 and conflict.json()["state"] == "pending"

    assert server.cli("pairing", "deny", str(pending["requestId"])).status == 0
    again = request_pairing(server, source, ["web01", "web02"])
    assert again["requestId"] == pending["requestId"]
    assert {a["state"] for a in again["agents"]} == {"pending"}
    # Ignoring the new request returns the source to its denial, not to nothing.
    assert server.cli("pairing", "ignore", str(pending["requestId"])).status == 0
    with server.client(source) as client:
        answer = client.post("slave/pairing/sync").json()
    assert answer["state"] == "Denied"
    assert [a["agentInfo"]["id"] for a in answer["agents"]] == []


def test_unconfirmed_request_expires(make_server, make_source):
    server = make_server("[pairing]\nunconfirmed_ttl = 0\n")
    source = make_source("a")
    with server.client() as client:
        assert (
            client.post("slave/pairing/request", json=pairing_body(source, ["a"])).status_code
            == 202
        )
    with server.client(source) as client:
        late = client.post("slave/pairing/sync")
    assert late.status_code == 401 and "expired" in late.json()["message"]
    assert _list(server, "--all") == []


def test_two_sources_approved_without_a_repository_get_different_repositories(server, make_source):
    first = pair_by_request(server, make_source("a"), ["web01"])
    second = pair_by_request(server, make_source("b"), ["web01"])
    assert first["agents"][0]["repositoryName"] != second["agents"][0]["repositoryName"]


def test_demand_pairs_at_once_with_administrator_credentials(server, admin, make_source):
    assert server.cli("repository", "create", "tenant").status == 0
    source = make_source("a")
    answer = pair_by_demand(server, source, ["web01", "db01"], admin, repository="tenant")
    assert answer["pairingState"] == "approved" and answer["wasRequested"] is False
    assert {a["repositoryName"] for a in answer["agents"]} == {"tenant"}
    with server.client(source) as client:
        assert client.get("slave/repositories").json()["repositories"][0]["name"] == "tenant"
    with server.client() as client:
        masters = client.get("slave/cores/masters", auth=admin).json()["masters"]
    assert [m["masterCoreInfo"]["id"] for m in masters] == [source.core_id]
    assert masters[0]["method"] == "demand" and masters[0]["decidedBy"] == admin[0]


def test_demand_with_bad_or_no_credentials_is_refused(server, admin, make_source):
    source = make_source("a")
    before = db_snapshot(server)
    with server.client() as client:
        bad = client.post(
            "slave/pairing/demand", json=pairing_body(source, ["a"]), auth=(admin[0], "wrong")
        )
        none = client.post("slave/pairing/demand", json=pairing_body(source, ["a"]))
        masters = client.get("slave/cores/masters", auth=(admin[0], "wrong"))
    assert bad.status_code == 401 and "credentials" in bad.json()["message"]
    assert none.status_code == 401 and masters.status_code == 401
    assert db_snapshot(server) == before


def test_a_source_sees_only_its_own_pairing_and_agents(server, admin, make_source):
    alice, bob = make_source("alice"), make_source("bob")
    pair_by_demand(server, alice, ["web01", "alice-only"], admin)
    pair_by_demand(server, bob, ["web01", "bob-only"], admin)
    with server.client(alice) as client:
        mine = client.post("slave/pairing/sync").json()
        repos = client.get("slave/repositories").json()["repositories"]
        own = client.get("slave/agents/web01/replication/verifyStart")
        other = client.get("slave/agents/bob-only/replication/verifyStart")
        unknown = client.get("slave/agents/nobody/replication/verifyStart")
    assert sorted(a["agentInfo"]["id"] for a in mine["agents"]) == ["alice-only", "web01"]
    assert [r["agents"] for r in repos] == [["alice-only", "web01"]]
    assert own.status_code == 200 and own.json()["canReplicate"] is True
    assert other.status_code == 404 and unknown.status_code == 404
    # Another source's agent answers exactly as an agent nobody has.
    assert other.text.replace("bob-only", "X") == unknown.text.replace("nobody", "X")


def test_agent_verify_start_says_why_an_agent_cannot_replicate(server, admin, make_source):
    assert server.cli("repository", "create", "full", "--quota", "0").status == 0
    source = make_source("a")
    pair_by_demand(server, source, ["web01"], admin, repository="full")
    conn = apsw.Connection(str(server.database_path))
    conn.set_busy_timeout(5000)
    conn.execute("UPDATE agents SET paused = 1 WHERE agent_id = 'web01'")
    conn.close()
    with server.client(source) as client:
        answer = client.get("slave/agents/web01/replication/verifyStart").json()
    assert answer["canReplicate"] is False and answer["isReplicationPaused"] is True
    assert answer["freeBytes"] == 0 and answer["repositoryName"] == "full"
    assert any("no space left" in r for r in answer["reasons"])
    assert any("paused" in r for r in answer["reasons"])


def test_unpairing_forbids_everything_after_and_records_the_deletion_request(
    server, admin, make_source
):
    source = make_source("a")
    pair_by_demand(server, source, ["web01"], admin)
    with server.client(source) as client:
        bad = client.delete("slave/pairing", params={"deleteRecoveryPoints": "perhaps"})
        gone = client.delete("slave/pairing", params={"deleteRecoveryPoints": "true"})
        repos = client.get("slave/repositories")
        again = client.delete("slave/pairing")
        synced = client.post("slave/pairing/sync")
    assert bad.status_code == 422 and bad.json()["field"] == "deleteRecoveryPoints"
    assert gone.status_code == 200 and gone.json()["deleteRecoveryPointsRequested"] is True
    assert repos.status_code == 403 and again.status_code == 403
    assert synced.json()["state"] == "Unpaired"
    with server.client() as client:
        masters = client.get("slave/cores/masters", auth=admin).json()["masters"]
        every = client.get("slave/cores/masters", params={"all": "true"}, auth=admin).json()
    assert masters == []
    [record] = every["masters"]
    assert record["state"] == "unpaired" and record["deleteRecoveryPointsRequested"] is True
    assert [a["agentInfo"]["id"] for a in record["agents"]] == ["web01"]  # data is kept


def test_replication_verify_start_says_whether_a_source_could_pair(server, admin, make_source):
    source = make_source("a")
    info = pairing_body(source, [])["pairingRequest"]
    good = {
        "masterCoreInfo": info["masterCoreInfo"],
        "clientCertificate": info["clientCertificate"],
    }
    old = {"masterCoreInfo": {**info["masterCoreInfo"], "apiVersion": "0.9"}}
    url = "slave/replication/verifyStart/"
    with server.client() as client:
        yes = client.post(url, params={"useCredentials": "false"}, json=good).json()
        too_old = client.post(url, json=old).json()
        no_cert = client.post(url, json={**good, "clientCertificate": "hello"}).json()
        demand_ok = client.post(url, params={"useCredentials": "true"}, json=good, auth=admin)
        demand_bad = client.post(
            url, params={"useCredentials": "true"}, json=good, auth=(admin[0], "nope")
        ).json()
    assert yes["canPair"] is True and yes["reasons"] == [] and yes["apiVersion"] == API_VERSION
    assert too_old["canPair"] is False and too_old["versionCompatible"] is False
    assert no_cert["canPair"] is False and no_cert["certificateAcceptable"] is False
    assert demand_ok.status_code == 200 and demand_ok.json()["credentialsValid"] is True
    assert demand_bad["canPair"] is False and demand_bad["credentialsValid"] is False

    request_pairing(server, source, ["a"])
    with server.client() as client:
        pending = client.post(url, json=good).json()
    assert pending["canPair"] is False and "pending" in pending["reasons"][0]


def test_unpaired_source_may_request_again_and_keeps_its_repository(server, admin, make_source):
    source = make_source("a")
    first = pair_by_demand(server, source, ["web01"], admin)
    with server.client(source) as client:
        assert client.delete("slave/pairing").status_code == 200
    again = pair_by_request(server, source, ["web01", "web02"])
    assert again["requestId"] == first["requestId"] and again["wasRequested"] is True
    repos = {a["agentInfo"]["id"]: a["repositoryName"] for a in again["agents"]}
    assert repos == {"web01": first["agents"][0]["repositoryName"]} | {
        "web02": first["agents"][0]["repositoryName"]
    }
