"""Quotas over a real server: a push over quota is refused (507) at key negotiation, before
any record is sent, and leaves nothing behind; free-space answers count reservations; what
the recycle bin holds is outside the quota."""

from __future__ import annotations

from datapath_helpers import KIB, MIB, DataPathClient, key_entries, split
from inventory_helpers import query, random_bytes
from pairing_helpers import pair_by_demand
from replicore import protocol

BS = 64 * KIB


def quota_source(server, make_source, admin, quota: str = "1M"):
    assert server.cli("repository", "create", "small", "--quota", quota).status == 0
    source = make_source("a")
    pair_by_demand(server, source, ["web01", "db01"], admin, repository="small")
    return source


def counts(server) -> tuple[int, ...]:
    return tuple(
        query(server, f"SELECT count(*) FROM {table}")[0][0]
        for table in ("records", "volume_images", "recovery_points", "session_reservations")
    )


def test_a_push_over_quota_gets_507_before_any_data_and_leaves_nothing(server, make_source, admin):
    source = quota_source(server, make_source, admin)
    image = random_bytes(1, 4 * MIB)
    with server.client(source) as client:
        push = DataPathClient(client, "web01")
        sid = push.open_ok("c", 1, len(image), BS)["sessionId"]
        refused = push.keys(sid, protocol.encode_keys(key_entries(split(image, BS))))
        assert refused.status_code == 507, refused.text
        assert refused.json()["neededBytes"] == 4 * MIB
        assert refused.json()["availableBytes"] == 1 * MIB
        assert counts(server) == (0, 0, 0, 0)
        assert push.end(sid, commit=False).status_code == 200
        assert query(server, "SELECT count(*) FROM sessions")[0][0] == 0
        agent = client.get("slave/agents/web01").json()
    assert agent["freeSpace"] == 1 * MIB and agent["space"]["usedBytes"] == 0


def test_free_space_answers_count_open_sessions_reservations(server, make_source, admin):
    source = quota_source(server, make_source, admin)
    image = random_bytes(2, 512 * KIB)
    with server.client(source) as client:
        push = DataPathClient(client, "web01")
        sid = push.open_ok("c", 1, len(image), BS)["sessionId"]
        assert len(push.missing(sid, key_entries(split(image, BS)))) == 8
        agent = client.get("slave/agents/db01").json()
        ability = client.get("slave/agents/db01/replication/verifyStart").json()
        verify = client.post(
            "slave/request/agents/verify", json={"agents": [{"agentInfo": {"id": "new01"}}]}
        ).json()
    assert agent["space"]["reservedBytes"] == 512 * KIB
    assert agent["freeSpace"] == 512 * KIB == ability["freeBytes"]
    assert verify["agents"][0]["canAdd"]


def test_a_full_quota_refuses_new_sessions_and_binned_data_is_outside_it(
    server, make_source, admin
):
    source = quota_source(server, make_source, admin)
    image = random_bytes(3, 1 * MIB)  # incompressible: stored as sent, exactly the quota
    with server.client(source) as client:
        DataPathClient(client, "db01").push("c", 1, image, BS)
        full = DataPathClient(client, "web01").open("c", 1, 64 * KIB, BS)
        assert full.status_code == 507, full.text
        agent = client.get("slave/agents/web01").json()
        assert agent["freeSpace"] == 0 and not agent["isReplicationAvailable"]
        ability = client.get("slave/agents/web01/replication/verifyStart").json()
        assert not ability["canReplicate"] and "no space left" in ability["reasons"][0]
        check = client.post(
            "slave/request/agents/verify", json={"agents": [{"agentInfo": {"id": "new01"}}]}
        ).json()
        assert "no space left" in check["agents"][0]["reasons"][0]
        assert client.delete("slave/agents/db01").status_code == 200
        agent = client.get("slave/agents/web01").json()
        assert agent["freeSpace"] == 1 * MIB and agent["space"]["usedBytes"] == 0
        other = random_bytes(4, 1 * MIB)
        DataPathClient(client, "web01").push("c", 1, other, BS)
    listed = server.cli("repository", "list", "--json")
    assert '"used_bytes": 1048576' in listed.stdout
