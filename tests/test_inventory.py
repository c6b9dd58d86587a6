"""Agents and recovery points over a real server: counts and pages agree with what was
pushed, orphans come and go, the views of `slave/agents`, free space, status, rpsinfo,
repository relationships, and a source never seeing another source's agents."""

from __future__ import annotations

from typing import Any

import pytest

from datapath_helpers import KIB, DataPathClient, make_image, mutate
from inventory_helpers import ADMIN, export, module_server, query, snapshot
from pairing_helpers import pair_by_demand, pairing_body
from replicore.source import identity

BS = 16 * KIB
IMAGE_FIELDS = {
    "id",
    "driverVolumeId",
    "epochNumber",
    "previousEpochNumber",
    "headerHash",
    "isOrphaned",
    "utcCreatedTimestamp",
    "volumeImageHash",
    "rollupGranularityCell",
}


def stamp(hour: int) -> str:
    return f"2026-11-{20 + hour // 24:02d}T{hour % 24:02d}:00:00Z"


def populate(server: Any, a: Any, b: Any, admin: Any) -> None:
    """Source a (agents web01, db01) and source b (its own web01), each in its own
    repository; a pushes 5 recovery points of web01 (epochs 1..5), b pushes 2."""
    pair_by_demand(server, a, ["web01", "db01"], admin)
    pair_by_demand(server, b, ["web01"], admin)
    image = make_image(11, 256 * KIB, BS)
    with server.client(a) as client:
        push = DataPathClient(client, "web01")
        for epoch in range(1, 6):
            image = mutate(image, BS, [epoch], seed=epoch)
            push.push(
                "c",
                epoch,
                image,
                BS,
                epoch - 1 or None,
                [epoch] if epoch > 1 else None,
                recovery_point=f"a-rp{epoch}",
                timestamp=stamp(epoch),
            )
    with server.client(b) as client:
        push = DataPathClient(client, "web01")
        for epoch in (1, 2):
            push.push(
                "c",
                epoch,
                image,
                BS,
                epoch - 1 or None,
                recovery_point=f"b-rp{epoch}",
                timestamp=stamp(epoch),
            )


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the tests that only read: (server, (a, b), admin)."""
    root = tmp_path_factory.mktemp("inventory")
    with module_server(root / "server") as server:
        a, b = identity.init(root / "source-a"), identity.init(root / "source-b")
        populate(server, a, b, ADMIN)
        yield server, (a, b), ADMIN


@pytest.fixture
def sources(server, make_source, admin):
    """A fresh server populated as `shared`, for tests that change things."""
    a, b = make_source("a"), make_source("b")
    populate(server, a, b, admin)
    return a, b


def get(server: Any, source: Any, path: str, **kwargs: Any) -> Any:
    with server.client(source) as client:
        return client.get(path, **kwargs)


def test_counts_and_pages_agree_with_what_was_pushed(shared):
    server, sources, _ = shared
    a, b = sources
    assert get(server, a, "slave/agents/web01/rpsCount").json()["count"] == 5
    assert get(server, b, "slave/agents/web01/rpsCount").json()["count"] == 2
    everything = get(server, a, "slave/agents/web01/rps").json()["recoveryPoints"]
    assert [p["id"] for p in everything] == ["a-rp5", "a-rp4", "a-rp3", "a-rp2", "a-rp1"]
    assert everything[0]["timestamp"] == stamp(5)
    assert everything[0]["volumeImages"][0]["id"] == "c:5"
    pages = []
    for skip in range(0, 7, 2):
        page = get(server, a, f"slave/agents/web01/skipCount/{skip}/maxCount/2/rps").json()
        assert page["skipCount"] == skip and page["maxCount"] == 2
        pages += [p["id"] for p in page["recoveryPoints"]]
    assert pages == [p["id"] for p in everything]
    none = get(server, a, "slave/agents/web01/skipCount/0/maxCount/0/rps").json()
    assert none["recoveryPoints"] == []


@pytest.mark.parametrize(
    ("skip", "count", "field"),
    [
        ("-1", "2", "skipCount"),
        ("0", "1001", "maxCount"),
        ("x", "2", "skipCount"),
        ("0", "99999999999999999999", "maxCount"),
        ("2147483648", "1", "skipCount"),
    ],
)
def test_page_bounds_are_checked(shared, skip, count, field):
    server, sources, _ = shared
    response = get(server, sources[0], f"slave/agents/web01/skipCount/{skip}/maxCount/{count}/rps")
    assert response.status_code == 422 and response.json()["field"] == field


def test_another_sources_agent_is_404_even_with_the_same_id(shared):
    server, sources, _ = shared
    _, b = sources
    before = snapshot(server)
    with server.client(b) as client:
        for method, path in [
            ("GET", "slave/agents/db01"),
            ("GET", "slave/agents/db01/rps"),
            ("GET", "slave/agents/db01/rpsCount"),
            ("GET", "slave/agents/db01/skipCount/0/maxCount/5/rps"),
            ("GET", "slave/agents/db01/replicatedVolumeImagesNew"),
            ("GET", "slave/agents/db01/orphanedReplicatedVolumeImages"),
            ("GET", "slave/agents/nobody/rps"),
            ("DELETE", "slave/agents/db01"),
            ("PUT", "slave/agents/db01/status"),
        ]:
            response = client.request(method, path, json={"isPaused": True})
            assert response.status_code == 404, (method, path, response.text)
        own = client.get("slave/agents/web01/rps").json()["recoveryPoints"]
        assert [p["id"] for p in own] == ["b-rp2", "b-rp1"]
        listed = client.get("slave/agents", params={"view": "all"}).json()["agents"]
        assert [x["agentInfo"]["id"] for x in listed] == ["web01"]
        info = client.get("slave/replicatedagents/rpsinfo").json()["agents"]
        assert [(x["agentId"], x["recoveryPointCount"]) for x in info] == [("web01", 2)]
        relations = client.get("slave/cores/agentRepositoryRelationships").json()
        assert [x["agentId"] for x in relations["relationships"]] == ["web01"]
        usage = client.get("slave/agents", params={"view": "usage"}).json()["agents"]
        assert [x["agentId"] for x in usage] == ["web01"]
    assert snapshot(server) == before
    assert "db01" not in str(before.get("bin_entries"))


def test_orphaned_images_appear_when_a_parent_is_missing_and_go_when_it_arrives(
    server, sources, tmp_path
):
    a, _ = sources
    base = make_image(21, 128 * KIB, BS)
    second = mutate(base, BS, [1], seed=1)
    third = mutate(second, BS, [2], seed=2)
    with server.client(a) as client:
        push = DataPathClient(client, "db01")
        push.push("v", 1, base, BS, recovery_point="d1", timestamp=stamp(1))
        push.push("v", 3, third, BS, 2, recovery_point="d3", timestamp=stamp(3))
        orphans = client.get("slave/agents/db01/orphanedReplicatedVolumeImages").json()
        assert [(i["id"], i["missingEpochNumber"]) for i in orphans["volumeImages"]] == [("v:3", 2)]
        points = client.get("slave/agents/db01/rps").json()["recoveryPoints"]
        assert [(p["id"], p["isOrphaned"]) for p in points] == [("d3", True), ("d1", False)]
        push.push("v", 2, second, BS, 1, only=[1], recovery_point="d2", timestamp=stamp(2))
        orphans = client.get("slave/agents/db01/orphanedReplicatedVolumeImages").json()
        assert orphans["volumeImages"] == []
        listed = client.get("slave/agents/db01/replicatedVolumeImagesNew").json()
    assert [i["id"] for i in listed["volumeImages"]] == ["v:1", "v:2", "v:3"]
    for image in listed["volumeImages"]:
        assert set(image) >= IMAGE_FIELDS and image["isOrphaned"] is False
        assert set(image["rollupGranularityCell"]) == {"lowerBound", "upperBound", "isAdHoc"}
    assert listed["volumeImages"][2]["previousEpochNumber"] == 2
    assert listed["volumeImages"][2]["utcCreatedTimestamp"] == stamp(3)
    assert export(server, tmp_path, "--agent", "db01", "--volume", "v", "--epoch", "3") == third


def test_views_of_slave_agents(server, sources):
    a, _ = sources
    with server.client(a) as client:
        image = make_image(31, 128 * KIB, BS)
        DataPathClient(client, "db01").push("c", 1, image, BS, timestamp=stamp(9))
        assert server.cli("agents", "pause", "db01").status == 0
        default = client.get("slave/agents").json()
        assert default["view"] == "replicating"
        assert [x["agentInfo"]["id"] for x in default["agents"]] == ["web01"]
        every = {
            x["agentInfo"]["id"]: x for x in client.get("slave/agents?view=all").json()["agents"]
        }
        assert set(every) == {"db01", "web01"}
        assert every["db01"]["pausedByOperator"] and not every["db01"]["isReplicating"]
        assert every["web01"]["recoveryPointCount"] == 5
        assert every["web01"]["lastReplicatedRecoveryPointTimestamp"] == stamp(5)
        assert every["web01"]["freeSpace"] > 0
        usage = client.get("slave/agents?view=usage").json()
        bad = client.get("slave/agents?view=everything")
    assert bad.status_code == 422 and bad.json()["field"] == "view"
    per_agent = {x["agentId"]: x for x in usage["agents"]}
    assert per_agent["web01"]["recoveryPointCount"] == 5
    assert per_agent["web01"]["bytesProtected"] == 256 * KIB
    assert per_agent["db01"]["bytesProtected"] == 128 * KIB
    stored = query(
        server,
        "SELECT sum(r.stored_length) FROM records r JOIN agents a ON a.repository_id ="
        " r.repository_id WHERE a.agent_id = 'db01'",
    )[0][0]
    # Every record of the repository is one of these agents' (the shared share rounds down).
    total = usage["totals"]["bytesStored"]
    assert stored - 2 <= total <= stored
    assert per_agent["web01"]["bytesStoredShared"] > 0  # zero blocks are in both images


def test_free_space_of_an_agent_reflects_the_quota(shared):
    server, sources, _ = shared
    a, _ = sources
    repository = get(server, a, "slave/agents/web01").json()["repositoryName"]
    assert server.cli("repository", "quota", repository, "10M").status == 0
    answer = get(server, a, "slave/agents/web01").json()
    used = answer["space"]["usedBytes"]
    assert used > 0 and answer["space"]["quotaBytes"] == 10 * 1024 * 1024
    assert answer["freeSpace"] == 10 * 1024 * 1024 - used == answer["space"]["quotaFreeBytes"]
    assert answer["freeSpace"] <= answer["space"]["diskFreeBytes"]
    assert answer["metadata"] is None  # no metadata update was ever applied


def test_status_set_by_the_source_is_shown(server, sources):
    a, _ = sources
    with server.client(a) as client:
        ok = client.put(
            "slave/agents/web01/status",
            json={
                "isPaused": True,
                "lastJobId": "job-9",
                "lastJobState": "Running",
                "progress": 40.5,
                "message": "copying",
            },
        )
        assert ok.status_code == 200, ok.text
        before = snapshot(server)
        for body, field in [
            ({"progress": 150}, "progress"),
            ({"lastJobState": "exploded"}, "lastJobState"),
            ({"isPaused": "yes"}, "isPaused"),
        ]:
            refused = client.put("slave/agents/web01/status", json=body)
            assert refused.status_code == 422 and refused.json()["field"] == field
        assert snapshot(server) == before
        agent = client.get("slave/agents/web01").json()
        replicating = client.get("slave/agents").json()["agents"]
        resumed = client.put("slave/agents/web01/status", json={"isPaused": False})
    assert agent["status"]["lastJobState"] == "running" and agent["status"]["progress"] == 40.5
    assert agent["pauseReplication"] and agent["isReplicationPaused"]
    assert not agent["pausedByOperator"]
    assert [x["agentInfo"]["id"] for x in replicating] == ["db01"]
    assert resumed.json()["status"]["isPaused"] is False
    assert resumed.json()["status"]["lastJobId"] == "job-9"
    listed = server.cli("agents", "list")
    assert "running 40%" in listed.stdout


def test_rpsinfo_has_the_contract_fields(shared):
    server, sources, _ = shared
    info = get(server, sources[0], "slave/replicatedagents/rpsinfo").json()["agents"]
    assert info == [
        {
            "agentId": "web01",
            "agentDisplayName": "web01",
            "recoveryPointCount": 5,
            "oldestTimeStamp": stamp(1),
            "newestTimeStamp": stamp(5),
            "repositoryId": info[0]["repositoryId"],
            "repositoryName": info[0]["repositoryName"],
        }
    ]


def test_repository_relationships_in_all_four_forms(shared):
    server, sources, admin = shared
    a, b = sources
    own = {"masterCoreInfo": {"id": a.core_id}}
    with server.client(a) as client:
        plain = client.get("slave/cores/agentRepositoryRelationships").json()
        assert {x["agentId"] for x in plain["relationships"]} == {"web01", "db01"}
        assert client.get("slave/cores/agentRepositoryRelationshipsByDemand").status_code == 401
        demand = client.get("slave/cores/agentRepositoryRelationshipsByDemand", auth=admin)
        assert demand.json() == plain
        by_info = client.put("slave/cores/agentRepositoryRelationshipsByCoreInfo", json=own)
        assert by_info.json() == plain
        bare = client.put(
            "slave/cores/agentRepositoryRelationshipsByCoreInfo", json={"id": a.core_id}
        )
        assert bare.json() == plain
        both = client.put(
            "slave/cores/agentRepositoryRelationshipsByDemandByCoreInfo", json=own, auth=admin
        )
        assert both.json() == plain
        other = client.put(
            "slave/cores/agentRepositoryRelationshipsByCoreInfo",
            json={"masterCoreInfo": {"id": b.core_id}},
        )
        assert other.status_code == 403
        unknown = client.put(
            "slave/cores/agentRepositoryRelationshipsByCoreInfo", json={"id": "no-such-core"}
        )
        assert unknown.status_code == 403
        empty = client.put("slave/cores/agentRepositoryRelationshipsByCoreInfo", json={})
        assert empty.status_code == 422


def test_agents_added_by_request_wait_for_the_operator(server, sources):
    a, _ = sources
    body = {"agents": [{"agentInfo": {"id": "app01", "displayName": "App"}}]}
    with server.client(a) as client:
        check = client.post("slave/request/agents/verify", json=body).json()
        assert check["canAddAll"] and check["agents"][0]["canAdd"]
        asked = client.post("slave/agents/request", json=body)
        assert asked.status_code == 200 and asked.json()["agents"][0]["state"] == "pending"
        again = client.post("slave/request/agents/verify", json=body).json()["agents"][0]
        assert not again["canAdd"] and "already present" in again["reasons"][0]
        assert (
            client.get("slave/agents/app01/replication/verifyStart").json()["canReplicate"] is False
        )
        approved = server.cli("agents", "approve", "app01", "--source", a.core_id)
        assert approved.status == 0, approved.stderr
        ability = client.get("slave/agents/app01/replication/verifyStart").json()
        assert ability["canReplicate"], ability
        assert client.post("slave/agents/request", json=body).status_code == 409


def test_agents_added_by_demand_are_approved_at_once(server, sources, admin):
    a, b = sources
    body = {"agents": [{"agentInfo": {"id": "app02"}}, {"agentInfo": {"id": "app03"}}]}
    with server.client(a) as client:
        before = snapshot(server)
        assert client.post("slave/agents/demand", json=body).status_code == 401
        assert (
            client.post("slave/agents/demand", json=body, auth=("admin", "wrong")).status_code
            == 401
        )
        reserved = {"agents": [{"agentInfo": {"id": "request"}}]}
        refused = client.post("slave/agents/demand", json=reserved, auth=admin)
        assert refused.status_code == 422 and refused.json()["field"] == "agents[0].agentInfo.id"
        unknown = {"agents": [{"agentInfo": {"id": "app02"}, "repositoryName": "nope"}]}
        refused = client.post("slave/agents/demand", json=unknown, auth=admin)
        assert refused.status_code == 422 and refused.json()["field"] == "agents[0].repositoryName"
        assert snapshot(server) == before
        check = client.post("slave/demand/agents/verify", json=unknown, auth=admin).json()
        assert (
            check["credentialsValid"]
            and "no repository named 'nope'" in check["agents"][0]["reasons"][0]
        )
        bad = client.post("slave/demand/agents/verify", json=body, auth=("admin", "no")).json()
        assert bad["credentialsValid"] is False and not bad["canAddAll"]
        added = client.post("slave/agents/demand", json=body, auth=admin)
        assert added.status_code == 200, added.text
        assert [x["state"] for x in added.json()["agents"]] == ["approved", "approved"]
        ids = [x["agentInfo"]["id"] for x in client.get("slave/agents").json()["agents"]]
    assert ids == ["app02", "app03", "db01", "web01"]
    with server.client(b) as client:  # b's verify says nothing of a's agents
        check = client.post("slave/demand/agents/verify", json=body, auth=admin).json()
    assert check["canAddAll"], check


def test_literal_routes_win_and_their_words_are_not_agent_ids(shared):
    server, sources, _ = shared
    a, _ = sources
    with server.client(a) as client:
        assert client.get("slave/agents/request").status_code == 404
        assert client.get("slave/agents/demand").status_code == 404
        assert client.delete("slave/agents/replicationJob").status_code == 404
        body = {"agents": [{"agentInfo": {"id": "replicationJob"}}]}
        assert client.post("slave/agents/request", json=body).status_code == 422
        verdict = client.post("slave/request/agents/verify", json=body)
    assert verdict.status_code == 422


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("POST", "slave/agents/request", b"{not json", 400, None),
        ("POST", "slave/agents/request", b"{}", 422, "agents"),
        ("POST", "slave/agents/request", b'{"agents": []}', 422, "agents"),
        (
            "POST",
            "slave/agents/request",
            b'{"agents": [{"agentInfo": {"id": 5}}]}',
            422,
            "agents[0].agentInfo.id",
        ),
        (
            "POST",
            "slave/agents/request",
            b'{"agents": [{"agentInfo": {"id": "x1"}}, {"agentInfo": {"id": "x1"}}]}',
            422,
            "agents[1].agentInfo.id",
        ),
        (
            "POST",
            "slave/agents/request",
            b'{"agents": [{"agentInfo": {"id": "x1"}}]}' + b" " * (1024 * 1024),
            413,
            None,
        ),
        ("POST", "slave/request/agents/verify", b'{"agents": "web01"}', 422, "agents"),
        ("POST", "slave/request/agents/verify", b"", 400, None),
        ("PUT", "slave/agents/web01/status", b"[1, 2]", 422, None),
        ("PUT", "slave/agents/web01/status", b'{"progress": "half"}', 422, "progress"),
        ("PUT", "slave/cores/agentRepositoryRelationshipsByCoreInfo", b'{"id": ""}', 422, "id"),
        ("PUT", "slave/cores/agentRepositoryRelationshipsByCoreInfo", b"{", 400, None),
    ],
)
def test_bad_bodies_are_refused_naming_the_field_and_change_nothing(
    shared, method, path, body, status, field
):
    server, (a, _), _ = shared
    before = snapshot(server)
    with server.client(a) as client:
        response = client.request(
            method, path, content=body, headers={"Content-Type": "application/json"}
        )
    assert response.status_code == status, response.text
    assert response.json()["message"]
    if field is not None:
        assert response.json()["field"] == field
    assert snapshot(server) == before


def test_callers_without_a_paired_certificate_are_refused(shared, make_source):
    server, _, _ = shared
    stranger = make_source("stranger")
    paths = [
        ("GET", "slave/agents"),
        ("GET", "slave/agents/web01"),
        ("DELETE", "slave/agents/web01"),
        ("GET", "slave/agents/web01/rps"),
        ("GET", "slave/replicatedagents/rpsinfo"),
        ("POST", "slave/agents/request"),
        ("GET", "slave/cores/agentRepositoryRelationships"),
    ]
    with server.client() as client:
        for method, path in paths:
            assert client.request(method, path).status_code == 401, path
    with server.client() as client:  # a pending request: known, not paired
        requested = client.post("slave/pairing/request", json=pairing_body(stranger, ["z1"]))
        assert requested.status_code == 202
    with server.client(stranger) as client:
        assert client.post("slave/pairing/sync").status_code == 200
        for method, path in paths:
            response = client.request(method, path)
            assert response.status_code == 403 and response.json()["state"] == "pending", path
