"""The source's commands against a real server: `replicore source init|pair|status`, run in
process. The source pins the target's fingerprint and refuses a different one, refuses a
target whose API version it does not speak, and remembers the target it paired with."""

from __future__ import annotations

import io
import json

import pytest

from pairing_helpers import db_snapshot
from replicore.cli import main
from replicore.source import identity, pairing


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_source_init_makes_an_identity_once(tmp_path, capsys):
    directory = tmp_path / "src"
    status, out, _ = run(capsys, "source", "init", "--dir", str(directory))
    assert status == 0
    made = identity.load(directory)
    assert made.core_id in out and made.fingerprint in out
    # The group-level --dir is the same option; init keeps an existing identity.
    status, out, _ = run(capsys, "source", "--dir", str(directory), "init")
    assert status == 0 and made.core_id in out


def test_source_pair_by_request_then_status_after_approval(server, tmp_path, capsys):
    directory = str(tmp_path / "src")
    status, out, err = run(
        capsys,
        "source", "pair", "--dir", directory,
        "--target", server.url, "--fingerprint", server.fingerprint,
        "--agent", "web01", "--agent", "db01", "--customer-id", "C-9", "--email", "a@b.c",
    )  # fmt: skip
    assert status == 0, err
    assert "awaiting the operator" in out
    source = identity.load(tmp_path / "src")
    target = source.find_target(server.url)
    assert target["coreId"] == server.core_id and target["fingerprint"] == server.fingerprint
    assert target["certificate"] == server.pem

    [listed] = json.loads(server.cli("pairing", "list", "--json").stdout)
    assert listed["customerId"] == "C-9" and listed["fingerprint"] == source.fingerprint
    assert server.cli("pairing", "approve", str(listed["requestId"])).status == 0

    status, out, err = run(capsys, "source", "status", "--dir", directory, "--json")
    assert status == 0, err
    answer = json.loads(out)
    assert answer["state"] == "Established" and answer["targetUrl"] == server.url
    assert {a["state"] for a in answer["agents"]} == {"approved"}
    status, out, _ = run(capsys, "source", "--dir", directory, "status")
    assert status == 0 and "Established" in out and "agent web01: approved" in out


def test_source_pair_by_demand(server, admin, tmp_path, capsys, monkeypatch):
    directory = str(tmp_path / "src")
    monkeypatch.setattr("sys.stdin", io.StringIO(admin[1] + "\n"))
    status, out, err = run(
        capsys,
        "source", "pair", "--dir", directory, "--target", server.url,
        "--fingerprint", server.fingerprint.upper(), "--agent", "web01",
        "--demand", "--user", admin[0], "--password-stdin",
    )  # fmt: skip
    assert status == 0, err
    assert f"paired with {server.url}" in out and "agent web01: approved" in out
    source = identity.load(tmp_path / "src")
    with server.client(source) as client:
        assert client.get("slave/repositories").status_code == 200


def test_source_pair_by_demand_with_a_bad_password_fails(
    server, admin, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO("wrong password\n"))
    before = db_snapshot(server)
    status, _, err = run(
        capsys,
        "source", "pair", "--dir", str(tmp_path / "src"), "--target", server.url,
        "--fingerprint", server.fingerprint, "--agent", "web01",
        "--demand", "--user", admin[0], "--password-stdin",
    )  # fmt: skip
    assert status == 2 and "401" in err and "credentials" in err
    assert db_snapshot(server) == before


def test_source_pair_refuses_a_wrong_server_fingerprint(server, tmp_path, capsys):
    before = db_snapshot(server)
    status, _, err = run(
        capsys,
        "source", "pair", "--dir", str(tmp_path / "src"), "--target", server.url,
        "--fingerprint", "ab" * 32, "--agent", "web01",
    )  # fmt: skip
    assert status == 2 and "refusing" in err and "ab" * 32 in err
    assert db_snapshot(server) == before
    assert identity.load(tmp_path / "src").targets() == []


def test_source_pair_refuses_a_target_of_another_api_version(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pairing, "API_VERSION", "2.0")
    before = db_snapshot(server)
    status, _, err = run(
        capsys,
        "source", "pair", "--dir", str(tmp_path / "src"), "--target", server.url,
        "--fingerprint", server.fingerprint, "--agent", "web01",
    )  # fmt: skip
    assert status == 2 and "API version" in err
    assert db_snapshot(server) == before


def test_source_status_without_pairing_says_so(tmp_path, capsys):
    directory = str(tmp_path / "src")
    assert run(capsys, "source", "init", "--dir", directory)[0] == 0
    status, _, err = run(capsys, "source", "status", "--dir", directory)
    assert status == 1 and "not paired" in err
