"""`replicore push` mirrors its run as a replication job on the target: started with the
run, ended succeeded with its bytes, and an interrupted attempt ends as a job of its own."""

from __future__ import annotations

import json
from pathlib import Path

from pairing_helpers import pair_by_demand
from push_helpers import make_image, push

AGENT = "web01"


def jobs(server) -> list[dict]:
    result = server.cli("jobs", "list", "--all", "--json")
    assert result.status == 0, result.stderr
    return json.loads(result.stdout)


def test_a_push_shows_as_a_succeeded_job_with_its_transfer(server, admin, make_source, tmp_path):
    source = make_source("jobs")
    pair_by_demand(server, source, [AGENT], admin)
    image = tmp_path / "disk.img"
    make_image(image, 32)
    result = push(source, server, AGENT, {"vol-c": image}).result
    [job] = jobs(server)
    assert job["id"] == result["job_id"]
    assert job["state"] == "succeeded" and job["progress"] == 100
    assert job["bytesTransferred"] == result["bytes_sent"]
    assert job["agents"] == [{"id": AGENT, "volumeImagesToTransfer": ["vol-c:1"]}]
    [transfer] = job["transferJobs"]
    assert transfer["agentId"] == AGENT and transfer["state"] == "succeeded"


def test_a_failed_push_ends_its_job_failed_and_the_rerun_is_a_new_job(
    server, admin, make_source, tmp_path: Path
):
    source = make_source("jobs")
    pair_by_demand(server, source, [AGENT], admin)
    image = tmp_path / "disk.img"
    make_image(image, 32)
    assert server.cli("repository", "quota", "source-" + source.host_name, "1K").status == 0
    failed = push(source, server, AGENT, {"vol-c": image})
    assert failed.status != 0
    [job] = jobs(server)
    assert job["state"] == "failed" and job["errorDetails"]
    assert server.cli("repository", "quota", "source-" + source.host_name, "none").status == 0
    result = push(source, server, AGENT, {"vol-c": image}).result
    states = {j["id"]: j["state"] for j in jobs(server)}
    assert states == {job["id"]: "failed", result["job_id"]: "succeeded"}
