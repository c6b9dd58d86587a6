"""Who may call the pairing endpoints: 401 without a certificate, 403 for a known source that
is not paired (unconfirmed, pending, denied, unpaired), and the limits on anonymous pairing
requests (per-address rate, cap on undecided requests, requests switched off)."""

from __future__ import annotations

from pairing_helpers import db_snapshot, pair_by_demand, pairing_body, request_pairing

#: (method, path) of every endpoint that needs a paired, approved source.
PAIRED_ONLY = [
    ("GET", "slave/repositories"),
    ("GET", "slave/agents/web01/replication/verifyStart"),
    ("DELETE", "slave/pairing?deleteRecoveryPoints=false"),
]
SOURCE_ENDPOINTS = [*PAIRED_ONLY, ("POST", "slave/pairing/sync")]


def test_no_certificate_gets_401_on_every_source_endpoint(server, admin, make_source):
    pair_by_demand(server, make_source("a"), ["web01"], admin)
    with server.client() as client:
        for method, path in SOURCE_ENDPOINTS:
            response = client.request(method, path)
            assert response.status_code == 401, (method, path, response.text)
            assert "certificate" in response.json()["message"]


def test_pending_and_denied_sources_get_403_on_paired_only_endpoints(server, make_source):
    pending, denied = make_source("pending"), make_source("denied")
    request_pairing(server, pending, ["web01"])
    refused = request_pairing(server, denied, ["web01"])
    assert server.cli("pairing", "deny", str(refused["requestId"])).status == 0
    for source, state in ((pending, "pending"), (denied, "denied")):
        with server.client(source) as client:
            for method, path in PAIRED_ONLY:
                response = client.request(method, path)
                assert response.status_code == 403, (state, method, path, response.text)
                assert response.json()["state"] == state
            assert client.post("slave/pairing/sync").status_code == 200


def test_unconfirmed_source_gets_403_on_paired_only_endpoints(server, make_source):
    source = make_source("a")
    with server.client() as client:
        assert client.post("slave/pairing/request", json=pairing_body(source, ["web01"])).is_success
    with server.client(source) as client:
        refused = client.get("slave/repositories")
    assert refused.status_code == 403 and refused.json()["state"] == "unconfirmed"


def test_unpaired_source_gets_403_even_after_a_restart(server, admin, make_source):
    source = make_source("a")
    pair_by_demand(server, source, ["web01"], admin)
    with server.client(source) as client:
        assert client.delete("slave/pairing").status_code == 200
    server.restart()
    with server.client(source) as client:
        for method, path in PAIRED_ONLY:
            response = client.request(method, path)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["state"] == "unpaired"


def test_pairing_requests_are_rate_limited_per_address(make_server, make_source):
    server = make_server("[pairing]\nrequests_per_hour = 2\n")
    with server.client() as client:
        for name in ("a", "b"):
            body = pairing_body(make_source(name), ["web01"])
            assert client.post("slave/pairing/request", json=body).status_code == 202
        before = db_snapshot(server)
        limited = client.post("slave/pairing/request", json=pairing_body(make_source("c"), ["x"]))
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) > 0
    assert "too many" in limited.json()["message"]
    assert db_snapshot(server) == before


def test_undecided_pairing_requests_are_capped(make_server, make_source):
    server = make_server("[pairing]\nmax_pending = 1\n")
    first = request_pairing(server, make_source("a"), ["web01"])
    before = db_snapshot(server)
    with server.client() as client:
        full = client.post("slave/pairing/request", json=pairing_body(make_source("b"), ["x"]))
    assert full.status_code == 503 and "awaiting a decision" in full.json()["message"]
    assert db_snapshot(server) == before
    # A decision frees the place.
    assert server.cli("pairing", "deny", str(first["requestId"])).status == 0
    with server.client() as client:
        body = pairing_body(make_source("c"), ["x"])
        assert client.post("slave/pairing/request", json=body).status_code == 202


def test_pairing_requests_can_be_switched_off(make_server, make_source):
    server = make_server("[pairing]\naccept_requests = false\n")
    source = make_source("a")
    with server.client() as client:
        refused = client.post("slave/pairing/request", json=pairing_body(source, ["web01"]))
        verdict = client.post(
            "slave/replication/verifyStart/",
            json={"masterCoreInfo": pairing_body(source, [])["pairingRequest"]["masterCoreInfo"]},
        ).json()
    assert refused.status_code == 403 and "demand" in refused.json()["message"]
    assert verdict["canPair"] is False and verdict["requestsAccepted"] is False
    assert db_snapshot(server)["master_cores"] == []
