"""Mirrored replication jobs and agent metadata updates over a real server: jobs start, sync,
get transfer children and are failed when their source stops syncing; metadata updates are
applied when their phase ends and leave the metadata alone when cancelled; other sources'
jobs and agents are not found; bad input changes nothing."""

from __future__ import annotations

import json
import time
import types
from pathlib import Path
from typing import Any

import pytest

from pairing_helpers import db_snapshot, pair_by_demand, pairing_body
from replicore import config as config_module
from replicore.app import create_app
from replicore.store import agents, db, jobs, metadata, migrations

ADMIN = ("admin", "correct horse battery")
UPLOAD_ID = "0b7c1b6e-5f8a-4a57-9d5e-2f1f4f0e9a11"

META_V1: dict[str, Any] = {
    "displayName": "Web server",
    "hostName": "web01.corp.example",
    "operatingSystem": {
        "name": "Windows Server 2019",
        "version": "10.0.17763",
        "architecture": "x64",
    },
    "volumes": [
        {
            "id": "{0f1e2d3c-0000-4000-8000-000000000001}",
            "label": "System",
            "size": 107374182400,
            "fileSystem": "NTFS",
        },
        {
            "id": "{0f1e2d3c-0000-4000-8000-000000000002}",
            "label": "Data",
            "size": 536870912000,
            "fileSystem": "ReFS",
        },
    ],
    "applications": [
        {"type": "exchange", "name": "Exchange Server 2019", "version": "15.2.1118.7"}
    ],
}
META_V2: dict[str, Any] = {
    **META_V1,
    "displayName": "Web server (renamed)",
    "volumes": META_V1["volumes"][:1],
    "applications": [{"type": "sqlServer", "name": "SQL Server 2022", "version": "16.0.1000.6"}],
}


def add_admin(server: Any) -> tuple[str, str]:
    result = server.cli("admin", "add", ADMIN[0], "--password-stdin", stdin=ADMIN[1] + "\n")
    assert result.status == 0, result.stderr
    return ADMIN


def start_body(job_id: str, **agent_images: list[str]) -> dict[str, Any]:
    return {
        "id": job_id,
        "agents": [{"id": a, "volumeImagesToTransfer": v} for a, v in agent_images.items()],
        "numberParallelPipelines": 4,
        "sessionTimeout": 3600,
    }


def read_db(server: Any, fn: Any, *args: Any) -> Any:
    conn = db.open_existing(server.database_path)
    try:
        return fn(conn, *args)
    finally:
        conn.close()


def agent_pk(server: Any, agent_id: str) -> int:
    core = read_db(
        server, lambda c: db.row(c, "SELECT id FROM master_cores WHERE state = 'approved'")
    )
    found = read_db(server, agents.get, core["id"], agent_id)
    return int(found["id"])


def jobs_json(server: Any, *extra: str) -> list[dict[str, Any]]:
    result = server.cli("jobs", "list", "--json", *extra)
    assert result.status == 0, result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


@pytest.fixture
def paired(server: Any, make_source: Any, admin: Any) -> Any:
    source = make_source("alpha")
    pair_by_demand(server, source, ["web01", "db01"], admin)
    return source


# --- jobs ----------------------------------------------------------------------------------


def test_job_started_synced_and_finished_is_shown_to_the_operator(server, paired):
    body = start_body("job-1", web01=["{vol-a}:3", "{vol-b}:7"], db01=["vol-c:1"])
    with server.client(paired) as client:
        started = client.post("slave/agents/replicationJob/start", json=body)
        retried = client.post("slave/agents/replicationJob/start", json=body)
        listing = jobs_json(server)
        synced = client.post(
            "slave/agents/replicationJob/sync",
            json={
                "id": "job-1",
                "phase": "transfer",
                "progress": 50,
                "bytesTransferred": 1 << 20,
                "bytesTotal": 2 << 20,
            },
        )
        table = server.cli("jobs", "list")
        done = client.post(
            "slave/agents/replicationJob/sync", json={"id": "job-1", "state": "succeeded"}
        )
        after = client.post("slave/agents/replicationJob/sync", json={"id": "job-1"})
    assert started.status_code == 201, started.text
    job = started.json()
    assert job["id"] == "job-1" and job["kind"] == "replication" and job["state"] == "running"
    assert job["agents"] == [
        {"id": "db01", "volumeImagesToTransfer": ["vol-c:1"]},
        {"id": "web01", "volumeImagesToTransfer": ["{vol-a}:3", "{vol-b}:7"]},
    ]
    assert job["numberParallelPipelines"] == 4 and job["sessionTimeout"] == 3600
    assert job["startedAt"].endswith("Z")
    assert retried.status_code == 200 and retried.json()["startedAt"] == job["startedAt"]
    assert [j["id"] for j in listing] == ["job-1"] and listing[0]["state"] == "running"
    assert synced.status_code == 200, synced.text
    assert synced.json()["progress"] == 50 and synced.json()["phase"] == "transfer"
    assert synced.json()["bytesTransferred"] == 1 << 20
    assert table.status == 0
    line = next(x for x in table.stdout.splitlines() if x.startswith("job-1"))
    assert "running" in line and "50.0%" in line and "transfer" in line
    assert done.status_code == 200 and done.json()["state"] == "succeeded"
    assert done.json()["progress"] == 100 and done.json()["finishedAt"] is not None
    assert after.status_code == 409 and after.json()["state"] == "succeeded"
    assert jobs_json(server)[0]["state"] == "succeeded"  # recent jobs stay listed


def test_starting_a_new_job_fails_the_running_one_of_the_same_agent(server, paired):
    with server.client(paired) as client:
        client.post("slave/agents/replicationJob/start", json=start_body("old", web01=[]))
        new = client.post("slave/agents/replicationJob/start", json=start_body("new", web01=[]))
        old_sync = client.post("slave/agents/replicationJob/sync", json={"id": "old"})
    assert new.status_code == 201
    assert old_sync.status_code == 409 and old_sync.json()["state"] == "failed"
    assert "superseded by job new" in old_sync.json()["message"]


def test_transfer_job_mirrors_one_agent_of_the_job(server, paired):
    with server.client(paired) as client:
        client.post(
            "slave/agents/replicationJob/start",
            json=start_body("job-t", web01=["v1:1", "v1:2"], db01=["v2:5"]),
        )
        created = client.post("slave/agents/web01/transferJob/job-t")
        again = client.post("slave/agents/web01/transferJob/job-t")
        explicit = client.post(
            "slave/agents/db01/transferJob/job-t",
            json={"volumeImagesToTransfer": ["v2:6"], "numberParallelPipelines": 2},
        )
        unknown_job = client.post("slave/agents/web01/transferJob/no-such-job")
        synced = client.post(
            "slave/agents/replicationJob/sync",
            json={
                "id": "job-t",
                "transfers": [{"agentId": "web01", "progress": 25.5, "state": "succeeded"}],
            },
        )
    assert created.status_code == 201, created.text
    transfers = {t["agentId"]: t for t in explicit.json()["transferJobs"]}
    assert transfers["web01"]["volumeImagesToTransfer"] == ["v1:1", "v1:2"]
    assert transfers["web01"]["numberParallelPipelines"] == 4
    assert transfers["db01"]["volumeImagesToTransfer"] == ["v2:6"]
    assert transfers["db01"]["numberParallelPipelines"] == 2
    assert again.status_code == 200
    assert len(again.json()["transferJobs"]) == 1
    assert unknown_job.status_code == 404
    after = {t["agentId"]: t for t in synced.json()["transferJobs"]}
    assert after["web01"]["state"] == "succeeded" and after["web01"]["progress"] == 25.5
    assert after["db01"]["state"] == "running"


def test_job_not_synced_within_the_timeout_is_failed(make_server, make_source):
    server = make_server("[jobs]\nsync_timeout = 0.5\n")
    source = make_source("slow")
    pair_by_demand(server, source, ["web01"], add_admin(server))
    with server.client(source) as client:
        started = client.post("slave/agents/replicationJob/start", json=start_body("j", web01=[]))
        assert started.status_code == 201
        deadline = time.monotonic() + 30
        while jobs_json(server)[0]["state"] == "running":
            assert time.monotonic() < deadline, "the sweep never failed the job"
            time.sleep(0.1)
        late = client.post("slave/agents/replicationJob/sync", json={"id": "j", "progress": 1})
    job = jobs_json(server)[0]
    assert job["state"] == "failed" and "not synced" in job["errorDetails"]
    assert late.status_code == 409 and late.json()["state"] == "failed"
    assert server.stop() == 0  # the sweep loop does not hold the shutdown


def _fresh_db(tmp_path: Path) -> Any:
    path = tmp_path / "unit.db"
    conn = db.connect(path, create=True)
    migrations.apply(conn, path)
    conn.execute(
        "INSERT INTO repositories(id, name, created_at) VALUES (1, 'r', 0);"
        "INSERT INTO master_cores(id, core_id, fingerprint, certificate, state, method,"
        " requested_at) VALUES (1, 'c', 'f', 'pem', 'approved', 'demand', 0);"
        "INSERT INTO agents(id, core_pk, agent_id, state, repository_id, created_at)"
        " VALUES (1, 1, 'a1', 'approved', 1, 0), (2, 1, 'a2', 'approved', 1, 0)"
    )
    return conn


def test_expire_jobs_fails_only_jobs_past_the_timeout(tmp_path):
    conn = _fresh_db(tmp_path)
    with db.transaction(conn):
        stale, _ = jobs.start_replication(
            conn, 1, "stale", [jobs.AgentImages("a1")], None, None, 100.0
        )
        fresh, _ = jobs.start_replication(
            conn, 1, "fresh", [jobs.AgentImages("a2")], None, None, 100.0
        )
        jobs.sync(conn, 1, "fresh", jobs.Progress(progress=10), {}, 150.0)
        expired = jobs.expire_jobs(conn, 170.0, 60.0)
    assert expired == [stale]
    assert jobs.view(conn, stale)["state"] == "failed"
    assert jobs.view(conn, fresh)["state"] == "running"
    with db.transaction(conn):
        assert jobs.expire_jobs(conn, 211.0, 60.0) == [fresh]
    conn.close()


def test_replication_job_routes_win_over_agent_routes(server, make_source, admin):
    # The literal words of agent routes are refused as agent ids, so they cannot be shadowed.
    source = make_source("odd")
    with server.client() as client:
        refused = client.post(
            "slave/pairing/demand",
            json=pairing_body(source, ["replicationJob"]),
            auth=admin,
        )
    assert refused.status_code == 422
    assert refused.json()["field"].endswith("agents[0].agentInfo.id")
    app = create_app(types.SimpleNamespace(config=config_module.Config()))  # type: ignore[arg-type]
    urls = app.url_map.bind("localhost")
    root = "/apprecovery/api/core/replicationcomms/"
    for path, method, endpoint in [
        ("slave/agents/replicationJob/start", "POST", "jobs.replication_job_start"),
        ("slave/agents/replicationJob/sync", "POST", "jobs.replication_job_sync"),
        ("slave/agents/replicationJob/transferJob/j", "POST", "jobs.transfer_job"),
        ("slave/agents/replicationJob/metadataUpdate", "POST", "metadata.metadata_update"),
        ("slave/agents/a/metadataUpdate/status", "GET", "metadata.metadata_update_status"),
        ("slave/sessions/0b7c1b6e-5f8a-4a57-9d5e-2f1f4f0e9a11/", "POST", "uploads.end_session"),
        (
            "slave/sessions/0b7c1b6e-5f8a-4a57-9d5e-2f1f4f0e9a11/data/5",
            "POST",
            "uploads.upload_data",
        ),
    ]:
        assert urls.match(root + path, method=method)[0] == endpoint, path
    # The data path's literal `sessions/new` is not taken for an upload session id.
    assert not urls.match(root + "slave/sessions/new", method="POST")[0].startswith("uploads.")


# --- metadata ------------------------------------------------------------------------------


def test_metadata_update_is_applied_when_the_transfer_starts_and_shown(server, paired):
    with server.client(paired) as client:
        client.post("slave/agents/replicationJob/start", json=start_body("m1", web01=["v:1"]))
        posted = client.post("slave/agents/web01/metadataUpdate", json=META_V1)
        running = client.get("slave/agents/web01/metadataUpdate/status")
        before = read_db(server, metadata.get, agent_pk(server, "web01"))
        client.post("slave/agents/web01/transferJob/m1")
        completed = client.get("slave/agents/web01/metadataUpdate/status")
    assert posted.status_code == 202, posted.text
    assert posted.json()["state"] == "running" and posted.json()["jobId"] == "m1"
    assert running.json()["state"] == "running" and running.json()["finishedAt"] is None
    assert before is None
    assert completed.json()["state"] == "completed"
    assert completed.json()["finishedAt"] is not None
    shown = read_db(server, metadata.get, agent_pk(server, "web01"))
    assert {k: shown[k] for k in META_V1} == META_V1
    assert shown["jobId"] == "m1"
    row = read_db(
        server,
        lambda c: db.row(c, "SELECT display_name, host_name FROM agents WHERE agent_id = 'web01'"),
    )
    assert row == {"display_name": "Web server", "host_name": "web01.corp.example"}


def test_cancelled_metadata_update_leaves_the_old_metadata(server, paired):
    with server.client(paired) as client:
        own = client.post("slave/agents/web01/metadataUpdateJob", json={**META_V1, "jobId": "mj"})
        client.post("slave/agents/replicationJob/sync", json={"id": "mj", "state": "succeeded"})
        client.post("slave/agents/replicationJob/start", json=start_body("m2", web01=[]))
        client.post("slave/agents/web01/metadataUpdate", json=META_V2)
        cancelled = client.delete("slave/agents/web01/metadataUpdate")
        again = client.delete("slave/agents/web01/metadataUpdate")
        client.post("slave/agents/replicationJob/sync", json={"id": "m2", "phase": "transfer"})
        client.post("slave/agents/replicationJob/sync", json={"id": "m2", "state": "succeeded"})
        status = client.get("slave/agents/web01/metadataUpdate/status")
    assert own.status_code == 201 and own.json()["kind"] == "metadata"
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    assert status.json()["state"] == "cancelled" and status.json()["jobId"] == "m2"
    shown = read_db(server, metadata.get, agent_pk(server, "web01"))
    assert {k: shown[k] for k in META_V1} == META_V1


def test_metadata_update_of_a_failed_job_is_not_applied(server, paired):
    with server.client(paired) as client:
        client.post("slave/agents/replicationJob/start", json=start_body("m3", db01=[]))
        client.post("slave/agents/db01/metadataUpdate", json=META_V2)
        client.post(
            "slave/agents/replicationJob/sync",
            json={"id": "m3", "state": "failed", "errorDetails": "source lost its disk"},
        )
        status = client.get("slave/agents/db01/metadataUpdate/status")
        cancel_late = client.delete("slave/agents/db01/metadataUpdate")
    assert status.json()["state"] == "failed"
    assert "source lost its disk" in status.json()["errorDetails"]
    assert cancel_late.status_code == 409
    assert read_db(server, metadata.get, agent_pk(server, "db01")) is None


def test_metadata_update_job_runs_on_its_own(server, paired):
    with server.client(paired) as client:
        started = client.post("slave/agents/db01/metadataUpdateJob", json=META_V2)
        job_id = started.json()["id"]
        status = client.get("slave/agents/db01/metadataUpdate/status")
        done = client.post(
            "slave/agents/replicationJob/sync", json={"id": job_id, "state": "succeeded"}
        )
    assert started.status_code == 201 and started.json()["metadataUpdates"][0]["agentId"] == "db01"
    assert status.json()["runsAsOwnJob"] is True and status.json()["state"] == "running"
    assert done.json()["metadataUpdates"][0]["state"] == "completed"
    shown = read_db(server, metadata.get, agent_pk(server, "db01"))
    assert shown["applications"] == META_V2["applications"]


def test_metadata_update_needs_a_running_replication_job(server, paired):
    with server.client(paired) as client:
        response = client.post("slave/agents/web01/metadataUpdate", json=META_V1)
        status = client.get("slave/agents/web01/metadataUpdate/status")
        cancel = client.delete("slave/agents/web01/metadataUpdate")
    assert response.status_code == 409 and "metadataUpdateJob" in response.json()["message"]
    assert status.status_code == 404 and cancel.status_code == 404


# --- isolation and bad input ---------------------------------------------------------------


def test_another_sources_jobs_and_agents_are_not_found(server, paired, make_source, admin):
    other = make_source("beta")
    pair_by_demand(server, other, ["web01", "mail01"], admin)
    with server.client(paired) as client:
        client.post("slave/agents/replicationJob/start", json=start_body("alpha-job", db01=[]))
        client.post("slave/agents/db01/metadataUpdate", json=META_V1)
    before = db_snapshot(server)
    with server.client(other) as client:
        answers = [
            client.post("slave/agents/replicationJob/start", json=start_body("x", db01=[])),
            client.post("slave/agents/replicationJob/sync", json={"id": "alpha-job"}),
            client.post("slave/agents/db01/transferJob/alpha-job"),
            client.post("slave/agents/web01/transferJob/alpha-job"),
            client.post("slave/agents/db01/metadataUpdate", json=META_V1),
            client.get("slave/agents/db01/metadataUpdate/status"),
            client.delete("slave/agents/db01/metadataUpdate"),
            client.post("slave/agents/db01/metadataUpdateJob", json=META_V1),
        ]
    assert [a.status_code for a in answers] == [404] * len(answers), [a.text for a in answers]
    # Another source's job is answered exactly as a job that never existed.
    with server.client(other) as client:
        never = client.post("slave/agents/replicationJob/sync", json={"id": "never-job"})
        never_transfer = client.post("slave/agents/web01/transferJob/never-job")
    assert answers[1].json() == {
        **never.json(),
        "message": never.json()["message"].replace("never-job", "alpha-job"),
    }
    assert answers[3].json()["message"] == never_transfer.json()["message"].replace(
        "never-job", "alpha-job"
    )
    assert db_snapshot(server) == before


def test_unpaired_callers_are_refused(server, paired, make_source):
    with server.client() as anonymous:
        response = anonymous.post("slave/agents/replicationJob/start", json=start_body("j"))
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("slave/agents/replicationJob/start", b"{not json", 400, None),
        ("slave/agents/replicationJob/start", b"", 400, None),
        ("slave/agents/replicationJob/start", {"id": "j", "agents": "web01"}, 422, "agents"),
        ("slave/agents/replicationJob/start", {"id": "j", "agents": []}, 422, "agents"),
        (
            "slave/agents/replicationJob/start",
            {"id": "j", "agents": [{"id": "web01", "volumeImagesToTransfer": ["novolume"]}]},
            422,
            "agents[0].volumeImagesToTransfer[0]",
        ),
        (
            "slave/agents/replicationJob/start",
            # A digit to str.isdigit() but not to int().
            {"id": "j", "agents": [{"id": "web01", "volumeImagesToTransfer": ["v:\u00b2"]}]},
            422,
            "agents[0].volumeImagesToTransfer[0]",
        ),
        (
            "slave/agents/replicationJob/start",
            {"id": "j", "agents": [{"id": "web01"}], "numberParallelPipelines": 0},
            422,
            "numberParallelPipelines",
        ),
        (
            "slave/agents/replicationJob/start",
            {"id": "bad id", "agents": [{"id": "web01"}]},
            422,
            "id",
        ),
        ("slave/agents/replicationJob/sync", {"id": "live", "progress": "half"}, 422, "progress"),
        ("slave/agents/replicationJob/sync", {"id": "live", "progress": 101}, 422, "progress"),
        ("slave/agents/replicationJob/sync", {"id": "live", "state": "paused"}, 422, "state"),
        (
            "slave/agents/replicationJob/sync",
            {"id": "live", "bytesTotal": 2**63},  # over SQLite's INTEGER
            422,
            "bytesTotal",
        ),
        (
            "slave/agents/replicationJob/sync",
            {"id": "live", "progress": 5, "transfers": [{"agentId": "web01"}]},
            404,
            "transfers[0].agentId",
        ),
        (
            "slave/agents/web01/transferJob/live",
            {"volumeImagesToTransfer": [7]},
            422,
            "volumeImagesToTransfer[0]",
        ),
        ("slave/agents/web01/metadataUpdate", {"displayName": "x"}, 422, "hostName"),
        (
            "slave/agents/web01/metadataUpdate",
            {**META_V1, "volumes": [{"id": "v", "size": -1}]},
            422,
            "volumes[0].size",
        ),
        (
            "slave/agents/web01/metadataUpdate",
            {**META_V1, "volumes": [{"id": "v", "size": 2**63}]},  # found by tests/test_fuzz_api
            422,
            "volumes[0].size",
        ),
        (
            "slave/agents/web01/metadataUpdate",
            {**META_V1, "applications": [{"type": "oracle"}]},
            422,
            "applications[0].type",
        ),
        (
            "slave/agents/web01/metadataUpdate",
            {**META_V1, "volumes": META_V1["volumes"] + META_V1["volumes"][:1]},
            422,
            "volumes[2].id",
        ),
        ("slave/agents/web01/metadataUpdateJob", {**META_V1, "jobId": "a b"}, 422, "jobId"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(server, paired, path, body, status, field):
    with server.client(paired) as client:
        live = client.post("slave/agents/replicationJob/start", json=start_body("live", web01=[]))
        assert live.status_code == 201
        before = db_snapshot(server)
        if isinstance(body, bytes):
            response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json().get("field") == field
    assert db_snapshot(server) == before
