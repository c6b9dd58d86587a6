"""The daemon starts with real TLS, answers anonymous discovery, refuses unknown certificates
at the handshake, checks administrator credentials, and stops cleanly on SIGTERM."""

from __future__ import annotations

import ssl

import httpx
import pytest

from replicore import API_VERSION
from replicore.source import connection


def test_summary_is_anonymous_and_names_the_core(server):
    with server.client() as client:
        response = client.get("slave/cores/noPairingSummaryInfo")
    assert response.status_code == 200
    body = response.json()
    assert body["coreId"] == server.core_id
    assert body["apiVersion"] == API_VERSION
    assert body["serverCertificateFingerprint"] == server.fingerprint


def test_validate_without_credentials_answers_core_id(server):
    with server.client() as client:
        response = client.get("slave/validate/", params={"useCredentials": "false"})
    assert response.status_code == 200
    assert response.json() == {"coreId": server.core_id}


def test_validate_with_credentials_checks_the_password(server, admin):
    with server.client() as client:
        good = client.get("slave/validate/", params={"useCredentials": "true"}, auth=admin)
        bad = client.get(
            "slave/validate/", params={"useCredentials": "true"}, auth=(admin[0], "wrong")
        )
        none = client.get("slave/validate/", params={"useCredentials": "true"})
    assert good.status_code == 200 and good.json()["credentialsValid"] is True
    assert bad.status_code == 401 and "credentials" in bad.json()["message"]
    assert bad.headers["WWW-Authenticate"].startswith("Basic")
    assert none.status_code == 401


def test_failed_admin_logins_are_rate_limited(server, admin):
    with server.client() as client:
        statuses = [
            client.get(
                "slave/validate/", params={"useCredentials": "true"}, auth=("admin", "nope")
            ).status_code
            for _ in range(11)
        ]
        after = client.get("slave/validate/", params={"useCredentials": "true"}, auth=admin)
    assert statuses[:10] == [401] * 10
    assert statuses[10] == 429
    assert after.status_code == 429
    assert int(after.headers["Retry-After"]) > 0


def test_never_seen_certificate_fails_the_handshake(server, make_source):
    stranger = make_source("stranger")
    # Under TLS 1.3 the client learns of the refusal on its first read, as a broken connection.
    with server.client(stranger) as client, pytest.raises((httpx.TransportError, ssl.SSLError)):
        client.get("slave/cores/noPairingSummaryInfo")


def test_unknown_route_is_json_404(server):
    with server.client() as client:
        response = client.get("nosuch")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_wrong_fingerprint_is_refused_by_pinning(server):
    wrong = "00" * 32
    with pytest.raises(connection.PinError):
        connection.pin(server.url, wrong)


def test_sigterm_stops_the_server_cleanly(server):
    assert server.stop() == 0
    assert not (server.state_dir / "daemon.json").exists()


def test_sigterm_does_not_wait_for_idle_keepalive_connections(make_server):
    # With a 60 s grace time, an idle keep-alive connection must not hold the stop: the
    # server ends it as soon as it has no request in progress.
    from ops_helpers import write_server_config

    server = make_server(start=False)
    write_server_config(server, "shutdown_timeout = 60.0")
    server.start()
    with server.client() as client:
        assert client.get("slave/cores/noPairingSummaryInfo").status_code == 200
        assert server.stop(timeout=20) == 0
