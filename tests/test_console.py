"""The web console over plain HTTPS (httpx, no browser): the login gate, the session cookie,
CSRF protection, the shared failed-login limit, and every operator action doing what the
matching `replicore` command does, with its audit row. The browser tests are in
test_console_browser.py."""

from __future__ import annotations

import hashlib
import re
import shlex
import time
from html import unescape
from typing import Any

import pytest

from console_helpers import (
    BLOCK,
    CONSOLE_PATH,
    audit_rows,
    console_client,
    csrf,
    csrf_of,
    logged_in,
    login_form,
    login_token_of,
    module_server,
    notices,
    post,
    push_image,
    start_job,
    sync_job,
)
from datapath_helpers import make_image
from faults_helpers import corrupt_record, execute, image_id, query, single_use_key, verify
from pairing_helpers import pair_by_demand, request_pairing, save_target
from replicore import config as config_module

ADMIN = ("admin", "correct horse battery")
PAGES = ["/", "/pairing", "/sources", "/agents", "/bin", "/jobs", "/audit", "/billing"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("console")
    with module_server(root, ADMIN, "[console]\nusage_sample_interval = 1\n") as running:
        yield running


@pytest.fixture
def console(server: Any) -> Any:
    with logged_in(server, ADMIN) as client:
        yield client


def pending_request(server: Any, make_source: Any, name: str, agents: list[str]) -> Any:
    source = make_source(name)
    answer = request_pairing(server, source, agents)
    return source, int(answer["requestId"])


def pair_in_console(server: Any, console: Any, make_source: Any, name: str, agents: list[str]):
    source, request_id = pending_request(server, make_source, name, agents)
    answer = post(console, f"/pairing/{request_id}/approve", repository="")
    assert answer.status_code == 303, answer.text
    with server.client(source) as client:
        synced = client.post("slave/pairing/sync").json()
    assert synced["state"] == "Established", synced
    save_target(server, source, synced)
    return source, request_id


def agent_pk(server: Any, agent_id: str) -> int:
    found = query(server, "SELECT id FROM agents WHERE agent_id = ?", (agent_id,))
    assert len(found) == 1, found
    return int(found[0][0])


# --------------------------------------------------------------------------
# Login, sessions, CSRF
# --------------------------------------------------------------------------


def test_every_page_and_asset_but_the_login_page_needs_a_session(server):
    with console_client(server) as anonymous:
        for path in [*PAGES, "/agents/1", "/bin/1", "/billing.csv", "/static/other.css", "/x/y"]:
            answer = anonymous.get(CONSOLE_PATH + path)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith(f"{CONSOLE_PATH}/login?next=")
        assert anonymous.get(f"{CONSOLE_PATH}/login").status_code == 200
        css = anonymous.get(f"{CONSOLE_PATH}/static/console.css")
        assert css.status_code == 200 and "text/css" in css.headers["content-type"]
        for path in ["/logout", "/pairing/1/deny", "/bin/1/restore"]:
            assert anonymous.post(CONSOLE_PATH + path, data={"csrf": "x"}).status_code == 403


def test_login_sets_a_secure_httponly_strict_cookie_and_stores_only_its_hash(server):
    with console_client(server) as client:
        answer = login_form(client, *ADMIN)
        assert answer.status_code == 303
        assert answer.headers["location"] == f"{CONSOLE_PATH}/"
        cookies = answer.headers.get_list("set-cookie")
        session = next(c for c in cookies if c.startswith("replicore_console="))
        attributes = {part.strip().split("=")[0].lower() for part in session.split(";")}
        assert {"secure", "httponly", "samesite", "path", "max-age", "expires"} <= attributes
        assert "SameSite=Strict" in session and f"Path={CONSOLE_PATH};" in session + ";"
        assert "Max-Age=28800" in session
        token = client.cookies["replicore_console"]
        stored = query(server, "SELECT token_hash, admin_name FROM console_sessions")
        assert (hashlib.sha256(token.encode()).digest(), "admin") in [
            (bytes(h), n) for h, n in stored
        ]
        assert all(token.encode() not in bytes(h) for h, _ in stored)
        assert client.get(f"{CONSOLE_PATH}/").status_code == 200
        # Logged in, the login page sends the operator to the dashboard.
        assert client.get(f"{CONSOLE_PATH}/login").status_code == 303
    rows = [r for r in audit_rows(server, "admin.login") if r["actor"] == "console:admin"]
    assert rows and rows[-1]["outcome"] == "ok" and rows[-1]["clientAddress"] == "127.0.0.1"


def test_wrong_password_is_refused_and_written_to_the_audit_log(server):
    with console_client(server) as client:
        answer = login_form(client, "admin", "not the password")
        assert answer.status_code == 401
        assert "Wrong administrator name or password" in answer.text
        assert "replicore_console" not in client.cookies
    failed = [r for r in audit_rows(server, "admin.login") if r["outcome"] == "failed"]
    assert failed[-1]["actor"] == "console:admin"
    assert "not the password" not in str(failed[-1])


def test_login_form_without_its_token_is_refused(server):
    with console_client(server) as client:
        page = client.get(f"{CONSOLE_PATH}/login")
        token = login_token_of(page.text)
        forged = client.post(
            f"{CONSOLE_PATH}/login",
            data={"login_token": token[::-1], "user": ADMIN[0], "password": ADMIN[1]},
        )
        assert forged.status_code == 403
    with console_client(server) as fresh:  # no login cookie at all
        answer = fresh.post(
            f"{CONSOLE_PATH}/login",
            data={"login_token": token, "user": ADMIN[0], "password": ADMIN[1]},
        )
        assert answer.status_code == 403 and "replicore_console" not in fresh.cookies


def test_post_without_session_or_with_missing_or_wrong_csrf_is_refused(
    server, console, make_source
):
    source, request_id = pending_request(server, make_source, "csrf", ["csrf-agent"])
    path = f"{CONSOLE_PATH}/pairing/{request_id}/approve"
    token = csrf(console)
    with console_client(server) as anonymous:
        assert anonymous.post(path, data={"csrf": token}).status_code == 403
    assert console.post(path, data={}).status_code == 403
    wrong = token[:-1] + ("1" if token[-1] != "1" else "2")
    assert console.post(path, data={"csrf": wrong}).status_code == 403
    other = console.post(
        path, data={"csrf": token}, headers={"Origin": "https://evil.example:8006"}
    )
    assert other.status_code == 403
    with server.client(source) as client:
        assert client.post("slave/pairing/sync").json()["pairingState"] == "pending"
    assert console.post(path, data={"csrf": token}).status_code == 303
    with server.client(source) as client:
        assert client.post("slave/pairing/sync").json()["state"] == "Established"


def test_logout_ends_the_session(server):
    with logged_in(server, ADMIN) as client:
        token = client.cookies["replicore_console"]
        assert client.post(f"{CONSOLE_PATH}/logout", data={}).status_code == 403
        answer = client.post(f"{CONSOLE_PATH}/logout", data={"csrf": csrf(client)})
        assert answer.status_code == 303 and answer.headers["location"] == f"{CONSOLE_PATH}/login"
        assert "replicore_console" not in client.cookies
    with console_client(server, cookies={"replicore_console": token}) as replay:
        assert replay.get(f"{CONSOLE_PATH}/").status_code == 303
    assert audit_rows(server, "admin.logout")[-1]["actor"] == "console:admin"


def test_removing_an_administrator_ends_their_sessions(server):
    other = ("other-admin", "another long password")
    added = server.cli("admin", "add", other[0], "--password-stdin", stdin=other[1] + "\n")
    assert added.status == 0, added.stderr
    with logged_in(server, other) as client:
        assert client.get(f"{CONSOLE_PATH}/").status_code == 200
        assert server.cli("admin", "remove", other[0]).status == 0
        assert client.get(f"{CONSOLE_PATH}/").status_code == 303


def test_unknown_pages_and_records_get_an_html_404(console):
    for path in ["/no/such/page", "/agents/99999", "/bin/99999"]:
        answer = console.get(CONSOLE_PATH + path)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"].startswith("text/html")
        assert "Not found" in answer.text


def test_pages_send_security_headers(console):
    answer = console.get(f"{CONSOLE_PATH}/")
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["cache-control"] == "no-store"
    assert "<script" not in answer.text


def test_session_ends_after_its_lifetime_or_when_left_idle(server):
    for column, value in (("expires_at", -1.0), ("last_seen_at", -1801.0)):
        with logged_in(server, ADMIN) as client:
            assert client.get(f"{CONSOLE_PATH}/jobs").status_code == 200
            token = hashlib.sha256(client.cookies["replicore_console"].encode()).digest()
            ((created, expires),) = query(
                server,
                "SELECT created_at, expires_at FROM console_sessions WHERE token_hash = ?",
                (token,),
            )
            assert expires - created == 28800
            execute(
                server,
                f"UPDATE console_sessions SET {column} = ? WHERE token_hash = ?",
                (time.time() + value, token),
            )
            answer = client.get(f"{CONSOLE_PATH}/jobs")
            assert answer.status_code == 303 and "/login" in answer.headers["location"]


def test_failed_logins_share_the_api_limit_and_get_429(make_server):
    server = make_server()
    server.cli("admin", "add", ADMIN[0], "--password-stdin", stdin=ADMIN[1] + "\n")
    with console_client(server) as client:
        for _ in range(10):
            assert login_form(client, "admin", "wrong password").status_code == 401
        limited = login_form(client, *ADMIN)  # even the right password now
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) > 0
        assert "Too many failed logins" in limited.text
    with server.client() as api:  # the API's Basic logins from this address are limited too
        assert api.get("slave/cores/masters", auth=ADMIN).status_code == 429
    outcomes = [r["outcome"] for r in audit_rows(server, "admin.login")]
    assert outcomes.count("failed") == 10 and "refused" in outcomes


def test_console_can_be_switched_off(make_server):
    server = make_server("[console]\nenabled = false\n")
    with console_client(server) as client:
        assert client.get(f"{CONSOLE_PATH}/login").status_code == 404
        assert client.get(f"{CONSOLE_PATH}/static/console.css").status_code == 404
    with server.client() as api:
        assert api.get("slave/validate").status_code == 200


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"path": "admin"}, "console.path"),
        ({"path": "/admin/"}, "console.path"),
        ({"cookie_name": "a b"}, "console.cookie_name"),
        ({"session_ttl": 0}, "console.session_ttl"),
        ({"quota_warning_percent": 120}, "console.quota_warning_percent"),
        ({"usage_sample_interval": 0.5}, "console.usage_sample_interval"),
        ({"unknown": 1}, "console.unknown"),
    ],
)
def test_config_refuses_bad_console_options(options, message):
    with pytest.raises(config_module.ConfigError, match=re.escape(message)):
        config_module.parse({"console": options})


# --------------------------------------------------------------------------
# Pairing requests
# --------------------------------------------------------------------------


def test_approve_into_a_new_named_repository_with_another_for_one_agent(
    server, console, make_source
):
    server.cli("repository", "create", "shared-pool")
    source, request_id = pending_request(server, make_source, "acme", ["acme-db", "acme-web"])
    page = console.get(f"{CONSOLE_PATH}/pairing")
    assert f"Request {request_id}" in page.text and source.core_id in page.text
    assert "acme-db" in page.text and "acme-web" in page.text
    answer = console.post(
        f"{CONSOLE_PATH}/pairing/{request_id}/approve",
        data={
            "csrf": csrf_of(page.text),
            "repository": "",
            "new_repository": "acme-repo",
            "agent_repository:acme-web": "shared-pool",
            "customer_id": "ACME-42",
            "email": "ops@acme.example",
            "comment": "",
        },
    )
    assert answer.status_code == 303
    shown = notices(console.get(answer.headers["location"]).text)
    assert any("acme-db into acme-repo" in n and "acme-web into shared-pool" in n for n in shown)
    with server.client(source) as client:
        synced = client.post("slave/pairing/sync").json()
    assert synced["state"] == "Established" and synced["customerId"] == "ACME-42"
    placed = {a["agentInfo"]["id"]: a["repositoryName"] for a in synced["agents"]}
    assert placed == {"acme-db": "acme-repo", "acme-web": "shared-pool"}
    approve = audit_rows(server, "pairing.approve")[-1]
    assert approve["actor"] == "console:admin" and approve["target"] == f"request {request_id}"
    assert approve["details"]["agents"] == placed and approve["clientAddress"] == "127.0.0.1"
    assert audit_rows(server, "repository.create")[-1]["target"] == "acme-repo"
    assert f"request {request_id}" in console.get(f"{CONSOLE_PATH}/audit").text


def test_approve_naming_two_repositories_is_refused_and_changes_nothing(
    server, console, make_source
):
    source, request_id = pending_request(server, make_source, "both", ["both-1"])
    answer = post(
        console,
        f"/pairing/{request_id}/approve",
        repository="shared-pool",
        new_repository="another-new-one",
    )
    assert answer.status_code == 303
    assert any("not both" in n for n in notices(console.get(f"{CONSOLE_PATH}/pairing").text))
    assert query(server, "SELECT 1 FROM repositories WHERE name = 'another-new-one'") == []
    with server.client(source) as client:
        assert client.post("slave/pairing/sync").json()["pairingState"] == "pending"
    unknown = post(console, f"/pairing/{request_id}/approve", repository="no-such-repo")
    assert unknown.status_code == 303
    shown = notices(console.get(f"{CONSOLE_PATH}/pairing").text)
    assert any("no repository named 'no-such-repo'" in n for n in shown)
    failed = audit_rows(server, "pairing.approve")[-1]
    assert failed["outcome"] == "failed" and failed["target"] == f"request {request_id}"


def test_deny_tells_the_source_the_reason_and_ignore_drops_the_request(
    server, console, make_source
):
    denied, deny_id = pending_request(server, make_source, "deny-me", ["d1"])
    _, ignore_id = pending_request(server, make_source, "ignore-me", ["i1"])
    assert post(console, f"/pairing/{deny_id}/deny", reason="unknown customer").status_code == 303
    assert post(console, f"/pairing/{ignore_id}/ignore").status_code == 303
    with server.client(denied) as client:
        answer = client.post("slave/pairing/sync").json()
    assert answer["state"] == "Denied" and answer["errorDetails"] == "unknown customer"
    assert query(server, "SELECT 1 FROM master_cores WHERE id = ?", (ignore_id,)) == []
    page = console.get(f"{CONSOLE_PATH}/pairing").text
    assert f"Request {deny_id}" not in page and f"Request {ignore_id}" not in page
    assert audit_rows(server, "pairing.deny")[-1]["details"]["reason"] == "unknown customer"
    assert audit_rows(server, "pairing.ignore")[-1]["target"] == f"request {ignore_id}"
    # Deciding twice is refused with a notice, not an error page.
    again = post(console, f"/pairing/{deny_id}/deny", reason="again")
    assert again.status_code == 303
    assert any(
        "denied, not pending" in n for n in notices(console.get(again.headers["location"]).text)
    )


# --------------------------------------------------------------------------
# Sources, agents, recycle bin
# --------------------------------------------------------------------------


def test_pausing_a_source_stops_its_sessions_until_resumed(server, console, make_source):
    source, core_pk = pair_in_console(server, console, make_source, "pausing", ["pause-agent"])
    assert post(console, f"/sources/{core_pk}/pause").status_code == 303
    page = console.get(f"{CONSOLE_PATH}/sources").text
    assert "Resume" in page
    image = make_image(7, 4 * BLOCK, BLOCK)
    with server.client(source) as client:
        opened = client.post(
            "slave/sessions/new",
            json={
                "agentId": "pause-agent",
                "jobId": "j",
                "driverVolumeId": "v",
                "epochNumber": 1,
                "blockSize": BLOCK,
                "size": len(image),
                "recoveryPointId": "rp",
                "recoveryPointTimestamp": "2026-11-27T10:00:00Z",
                "volumeCount": 1,
            },
        )
    assert opened.status_code == 409 and "paused" in opened.json()["message"]
    assert post(console, f"/sources/{core_pk}/resume").status_code == 303
    push_image(server, source, "pause-agent", "v", 1, image)
    actions = [r["action"] for r in audit_rows(server, "source.")]
    assert "source.pause" in actions and "source.resume" in actions


def test_unpairing_refuses_the_source_and_can_move_its_agents_to_the_bin(
    server, console, make_source
):
    source, core_pk = pair_in_console(server, console, make_source, "leaving", ["leave-1"])
    push_image(server, source, "leave-1", "v", 1, make_image(8, 3 * BLOCK, BLOCK))
    refused = post(console, f"/sources/{core_pk}/unpair", to_bin="yes")
    assert refused.status_code == 303  # without the confirmation box
    with server.client(source) as client:
        assert client.get("slave/agents").status_code == 200
    unpaired = post(console, f"/sources/{core_pk}/unpair", to_bin="yes", confirm="yes")
    assert unpaired.status_code == 303
    with server.client(source) as client:
        assert client.get("slave/agents").status_code == 403
    bin_page = console.get(f"{CONSOLE_PATH}/bin").text
    assert "leave-1" in bin_page
    row = audit_rows(server, "source.unpair")[-1]
    assert row["target"] == source.core_id and "leave-1" in row["details"]["binned"]


def test_agent_page_shows_recovery_points_and_an_export_command_that_works(
    server, console, make_source, tmp_path
):
    source, _ = pair_in_console(server, console, make_source, "exporter", ["exp-agent"])
    base = make_image(11, 6 * BLOCK, BLOCK)
    push_image(server, source, "exp-agent", "vol-a", 1, base, timestamp="2026-11-26T10:00:00Z")
    page = console.get(f"{CONSOLE_PATH}/agents")
    assert "exp-agent" in page.text
    pk = agent_pk(server, "exp-agent")
    detail = console.get(f"{CONSOLE_PATH}/agents/{pk}").text
    assert "rp-exp-agent-vol-a-1" in detail and "vol-a:1" in detail
    command = unescape(re.search(r'<code class="command">(.*?)</code>', detail).group(1))
    words = shlex.split(command)
    assert words[:2] == ["replicore", "export"] and "--source" in words
    output = tmp_path / "out.img"
    words[words.index("-o") + 1] = str(output)
    result = server.cli(*words[1:])
    assert result.status == 0, result.stderr
    assert output.read_bytes() == base


def test_orphaned_and_damaged_images_are_flagged(server, console, make_source):
    source, _ = pair_in_console(server, console, make_source, "broken", ["orphan-agent"])
    image = make_image(12, 4 * BLOCK, BLOCK)
    push_image(server, source, "orphan-agent", "vol", 5, image, previous=4)
    pk = agent_pk(server, "orphan-agent")
    detail = console.get(f"{CONSOLE_PATH}/agents/{pk}").text
    assert "missing epoch 4" in detail and "refused until its chain is repaired" in detail
    dashboard = console.get(f"{CONSOLE_PATH}/").text
    assert "orphaned" in dashboard and "orphan-agent" in dashboard
    index, key = single_use_key(server, image_id(server, "orphan-agent", "vol", 5))
    corrupt_record(server, key)
    status, _ = verify(server)
    assert status == 1
    detail = console.get(f"{CONSOLE_PATH}/agents/{pk}").text
    assert "damaged" in detail and "corrupt" in detail
    dashboard = console.get(f"{CONSOLE_PATH}/").text
    assert "damaged" in dashboard and "The last verify run" in dashboard
    assert index >= 0


def test_agents_are_paused_deleted_restored_and_purged(server, console, make_source):
    source, _ = pair_in_console(server, console, make_source, "binning", ["bin-agent"])
    image = make_image(13, 5 * BLOCK, BLOCK)
    push_image(server, source, "bin-agent", "v", 1, image)
    pk = agent_pk(server, "bin-agent")
    assert post(console, f"/agents/{pk}/pause").status_code == 303
    assert "Resume replication" in console.get(f"{CONSOLE_PATH}/agents/{pk}").text
    assert post(console, f"/agents/{pk}/resume").status_code == 303
    deleted = post(console, f"/agents/{pk}/delete", confirm="yes")
    assert deleted.headers["location"] == f"{CONSOLE_PATH}/bin"
    entry = query(server, "SELECT id FROM bin_entries WHERE agent_id = 'bin-agent'")[0][0]
    assert console.get(f"{CONSOLE_PATH}/agents/{pk}").status_code == 404
    assert "rp-bin-agent-v-1" in console.get(f"{CONSOLE_PATH}/bin/{entry}").text
    assert post(console, f"/bin/{entry}/restore").status_code == 303
    with server.client(source) as client:
        assert client.get("slave/agents/bin-agent/rpsCount").json()["count"] == 1
    # Purge: delete again, then purge the new entry.
    again = post(console, f"/agents/{agent_pk(server, 'bin-agent')}/delete", confirm="yes")
    assert again.status_code == 303
    entry = query(server, "SELECT id FROM bin_entries WHERE agent_id = 'bin-agent'")[0][0]
    assert post(console, f"/bin/{entry}/purge").status_code == 303  # unconfirmed: kept
    assert query(server, "SELECT 1 FROM bin_entries WHERE id = ?", (entry,))
    assert post(console, f"/bin/{entry}/purge", confirm="yes").status_code == 303
    assert query(server, "SELECT 1 FROM bin_entries WHERE id = ?", (entry,)) == []
    actions = [r["action"] for r in audit_rows(server, "agent.")]
    assert {"agent.pause", "agent.resume", "agent.delete"} <= set(actions)
    assert {r["action"] for r in audit_rows(server, "bin.")} >= {"bin.restore", "bin.purge"}


def test_pending_agent_of_a_paired_source_is_approved_from_the_agents_page(
    server, console, make_source, tmp_path
):
    source, _ = pair_in_console(server, console, make_source, "growing", ["first"])
    with server.client(source) as client:
        added = client.post(
            "slave/agents/request",
            json={"agents": [{"agentInfo": {"id": "second", "displayName": "second"}}]},
        )
    assert added.status_code in (200, 201, 202), added.text
    assert "Approve" in console.get(f"{CONSOLE_PATH}/agents").text
    assert post(console, f"/agents/{agent_pk(server, 'second')}/approve").status_code == 303
    state = query(server, "SELECT state FROM agents WHERE agent_id = 'second'")
    assert state == [("approved",)]
    approved = audit_rows(server, "agent.approve")[-1]
    assert approved["target"] == f"agent second of source {source.core_id}"
    assert approved["actor"] == "console:admin" and approved["details"]["repository"]


# --------------------------------------------------------------------------
# Jobs, billing, dashboard
# --------------------------------------------------------------------------


def test_jobs_page_shows_running_jobs_with_progress_and_refreshes(server, console, make_source):
    source, _ = pair_in_console(server, console, make_source, "jobber", ["job-agent"])
    with server.client(source) as client:
        start_job(client, "job-42", "job-agent", ["v:1"])
        sync_job(client, "job-42", phase="transfer", progress=40.0, bytesTransferred=400)
    page = console.get(f"{CONSOLE_PATH}/jobs").text
    assert "job-42" in page and 'value="40.0"' in page
    assert '<meta http-equiv="refresh"' in page
    assert "job-42" in console.get(f"{CONSOLE_PATH}/").text
    with server.client(source) as client:
        sync_job(client, "job-42", state="succeeded", progress=100.0)
    page = console.get(f"{CONSOLE_PATH}/jobs").text
    assert "job-42" in page and "succeeded" in page


def test_billing_csv_is_the_report_of_the_cli(server, console, make_source):
    source, _ = pair_in_console(server, console, make_source, "billed", ["bill-1"])
    push_image(server, source, "bill-1", "v", 1, make_image(21, 8 * BLOCK, BLOCK))
    month = time.strftime("%Y-%m", time.gmtime())
    answer = console.get(f"{CONSOLE_PATH}/billing.csv", params={"month": month})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    assert f"replicore-billing-{month}.csv" in answer.headers["content-disposition"]
    cli = server.cli("billing", "report", "--month", month, "--format", "csv")
    assert answer.text == cli.stdout
    assert "bill-1" in answer.text
    bad = console.get(f"{CONSOLE_PATH}/billing", params={"month": "2026-13"})
    assert bad.status_code == 422 and "month" in bad.text


def test_billing_chart_draws_the_usage_samples_per_customer(server, console, make_source):
    source, request_id = pair_in_console(server, console, make_source, "charted", ["chart-1"])
    execute(server, "UPDATE master_cores SET customer_id = 'CUST-7' WHERE id = ?", (request_id,))
    push_image(server, source, "chart-1", "v", 1, make_image(22, 8 * BLOCK, BLOCK))
    deadline = time.monotonic() + 20
    while not query(
        server,
        "SELECT 1 FROM usage_samples WHERE core_pk = ? AND customer_id = 'CUST-7'"
        " AND stored_bytes > 0",
        (request_id,),
    ):
        assert time.monotonic() < deadline, "no usage sample was taken"
        time.sleep(0.2)
    page = console.get(f"{CONSOLE_PATH}/billing", params={"days": "7"}).text
    assert "<polyline" in page and "CUST-7" in page and "Download CSV" in page


def test_dashboard_warns_of_a_full_quota_and_a_silent_source(make_server, make_source):
    server = make_server("[console]\nquota_warning_percent = 50\n")
    server.cli("admin", "add", ADMIN[0], "--password-stdin", stdin=ADMIN[1] + "\n")
    source = make_source("quiet")
    pair_by_demand(server, source, ["q1"], ADMIN, repository=None)
    push_image(server, source, "q1", "v", 1, make_image(31, 8 * BLOCK, BLOCK))
    (name,) = query(server, "SELECT name FROM repositories")[0]
    (used,) = query(server, "SELECT stored_bytes FROM record_usage")[0]
    assert server.cli("repository", "quota", name, str(int(used * 1.5))).status == 0
    with logged_in(server, ADMIN) as client:
        assert "has not been heard from" not in client.get(f"{CONSOLE_PATH}/").text
    three_days_ago = time.time() - 3 * 86400
    execute(server, "UPDATE master_cores SET confirmed_at = ?, last_contact_at = ?",
            (three_days_ago, three_days_ago))  # fmt: skip
    execute(server, "UPDATE volume_images SET committed_at = ?", (three_days_ago,))
    with logged_in(server, ADMIN) as client:
        page = client.get(f"{CONSOLE_PATH}/").text
    assert f"Repository {name} is 67% full" in page
    assert f"Source {source.host_name} has not been heard from for 3 days" in page
