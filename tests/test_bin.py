"""The recycle bin over a real server: what a source deletes disappears from its sight and
its quota but stays for the operator to restore (exports exact) or purge; purging plus
garbage collection gives the space back on disk; shared records stay; entries expire."""

from __future__ import annotations

import json
import time
from typing import Any

from datapath_helpers import KIB, MIB, DataPathClient, make_image, mutate
from inventory_helpers import add_admin, export, file_bytes, query, random_bytes, snapshot, wait_for
from pairing_helpers import pair_by_demand

BS = 64 * KIB
#: A short session timeout, so records pushed by a test are old enough for GC soon.
SESSION_TIMEOUT = 3.0
FAST_GC = f"[replication]\nsession_timeout = {SESSION_TIMEOUT}\n"


def bin_entries(server: Any) -> list[dict[str, Any]]:
    result = server.cli("bin", "list", "--json")
    assert result.status == 0, result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def test_a_deleted_agent_leaves_the_sources_sight_and_the_operator_restores_it_exactly(
    server, make_source, admin, tmp_path
):
    source = make_source("a")
    pair_by_demand(server, source, ["web01", "db01"], admin)
    first = make_image(1, 1 * MIB + 3000, BS)
    second = mutate(first, BS, [2, 5], seed=2)
    with server.client(source) as client:
        push = DataPathClient(client, "web01")
        push.push("c", 1, first, BS, recovery_point="rp1")
        push.push("c", 2, second, BS, 1, only=[2, 5], recovery_point="rp2")
        DataPathClient(client, "db01").push("c", 1, make_image(3, 256 * KIB, BS), BS)
        space = client.get("slave/agents/db01").json()["space"]
        deleted = client.delete("slave/agents/web01")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"agentId": "web01", "deleted": True, "recoveryPointCount": 2}
        for path in ("slave/agents/web01", "slave/agents/web01/rps", "slave/agents/web01/rpsCount"):
            assert client.get(path).status_code == 404
        listed = [
            a["agentInfo"]["id"] for a in client.get("slave/agents?view=all").json()["agents"]
        ]
        info = client.get("slave/replicatedagents/rpsinfo").json()["agents"]
        after = client.get("slave/agents/db01").json()["space"]
        again = client.delete("slave/agents/web01")
    assert listed == ["db01"] and [a["agentId"] for a in info] == ["db01"]
    assert again.status_code == 404
    # Outside the quota: the repository's used bytes no longer count web01's records.
    assert after["usedBytes"] < space["usedBytes"] - 1 * MIB // 2
    refused = server.cli("export", "--agent", "web01", "--volume", "c", "-o", str(tmp_path / "x"))
    assert refused.status != 0 and "no agent 'web01'" in refused.stderr
    [entry] = bin_entries(server)
    assert (entry["agentId"], entry["sourceCoreId"], entry["reason"]) == (
        "web01",
        source.core_id,
        "source",
    )
    assert entry["recoveryPointCount"] == 2 and entry["freedBytes"] > 0
    assert entry["expiresAt"] - entry["deletedAt"] == 14 * 86400
    restored = server.cli("bin", "restore", str(entry["id"]))
    assert restored.status == 0, restored.stderr
    assert bin_entries(server) == []
    assert export(server, tmp_path, "--agent", "web01", "--volume", "c", "--epoch", "1") == first
    assert export(server, tmp_path, "--agent", "web01", "--volume", "c", "--epoch", "2") == second
    with server.client(source) as client:
        points = client.get("slave/agents/web01/rps").json()["recoveryPoints"]
        assert [p["id"] for p in points] == ["rp2", "rp1"]
        third = mutate(second, BS, [7], seed=3)  # the chain goes on where it was
        DataPathClient(client, "web01").push("c", 3, third, BS, 2, only=[7])
    assert export(server, tmp_path, "--agent", "web01", "--volume", "c") == third


def test_purge_and_gc_shrink_the_file_by_the_agents_unique_data_and_keep_shared_records(
    make_server, make_source, tmp_path
):
    # 256 MiB took 14-27 s here: CI uses 64 MiB; bench/gc_shrink.py runs 256 MiB and 1 GiB.
    server = make_server(FAST_GC)
    source = make_source("a")
    pair_by_demand(server, source, ["web01", "db01"], add_admin(server))
    unique = 64 * MIB
    shared = random_bytes(1, 4 * MIB)
    web = shared + random_bytes(2, unique)
    web_next = mutate(web, BS, [70, 80], seed=5)
    dbs = shared + random_bytes(3, 2 * MIB)
    with server.client(source) as client:
        push = DataPathClient(client, "web01")
        push.push("c", 1, web, BS)
        push.push("c", 2, web_next, BS, 1, only=[70, 80])
        DataPathClient(client, "db01").push("c", 1, dbs, BS)
        pushed_at = time.monotonic()
        assert client.delete("slave/agents/web01").status_code == 200
    time.sleep(max(0.0, SESSION_TIMEOUT + 0.5 - (time.monotonic() - pushed_at)))
    kept = server.cli("gc", "--json")  # binned images keep their records
    assert kept.status == 0, kept.stderr
    assert json.loads(kept.stdout)["deleted_records"] == 0
    before = file_bytes(server)  # after gc's truncating checkpoint
    [entry] = bin_entries(server)
    assert entry["freedBytes"] == unique + 2 * BS
    purged = server.cli("bin", "purge", str(entry["id"]))
    assert purged.status == 0, purged.stderr
    assert f"freed {unique // BS + 2} of" in purged.stdout
    after = file_bytes(server)
    assert before - after >= 0.9 * (unique + 2 * BS), (before, after)
    assert bin_entries(server) == []
    assert export(server, tmp_path, "--agent", "db01", "--volume", "c") == dbs
    shared_records = query(server, "SELECT count(*) FROM records")[0][0]
    assert shared_records == (len(dbs) // BS)  # every record of db01, nothing else


def test_entries_are_purged_when_their_time_is_up(make_server, make_source, tmp_path):
    server = make_server(
        f"{FAST_GC}[recycle_bin]\nretention_days = 0.00005\nsweep_interval = 0.3\n"
    )
    source = make_source("a")
    pair_by_demand(server, source, ["web01", "db01"], add_admin(server))
    dbs = make_image(8, 512 * KIB, BS)
    with server.client(source) as client:
        DataPathClient(client, "web01").push("c", 1, random_bytes(9, 1 * MIB), BS)
        DataPathClient(client, "db01").push("c", 1, dbs, BS)
        assert client.delete("slave/agents/web01").status_code == 200
    # Purged after ~4.3 s, then its records collected once older than the session timeout.
    wait_for(lambda: bin_entries(server) == [], timeout=30)
    db_records = len({bytes(dbs[i : i + BS]) for i in range(0, len(dbs), BS)})
    wait_for(lambda: query(server, "SELECT count(*) FROM records")[0][0] == db_records, timeout=30)
    assert export(server, tmp_path, "--agent", "db01", "--volume", "c") == dbs


def test_unpairing_with_delete_recovery_points_moves_the_agents_to_the_bin(
    server, make_source, admin, tmp_path
):
    source = make_source("a")
    pair_by_demand(server, source, ["web01", "db01"], admin)
    image = make_image(4, 512 * KIB, BS)
    with server.client(source) as client:
        DataPathClient(client, "web01").push("c", 1, image, BS)
        DataPathClient(client, "db01").push("c", 1, image, BS)
        answer = client.delete("slave/pairing", params={"deleteRecoveryPoints": "true"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["agents"] == []
    entries = bin_entries(server)
    assert sorted((e["agentId"], e["reason"]) for e in entries) == [
        ("db01", "unpair"),
        ("web01", "unpair"),
    ]
    assert query(server, "SELECT count(*) FROM volume_images")[0][0] == 0
    pair_by_demand(server, source, ["web01"], admin)  # the source comes back
    for entry in entries:
        assert server.cli("bin", "restore", str(entry["id"])).status == 0
    assert export(server, tmp_path, "--agent", "db01", "--volume", "c") == image
    with server.client(source) as client:
        listed = client.get("slave/agents?view=all").json()["agents"]
    assert sorted(a["agentInfo"]["id"] for a in listed) == ["db01", "web01"]


def test_restore_refuses_to_clash_with_an_agent_the_source_added_again(
    server, make_source, admin, tmp_path
):
    source = make_source("a")
    pair_by_demand(server, source, ["web01"], admin)
    old, new = make_image(5, 256 * KIB, BS), make_image(6, 256 * KIB, BS)
    with server.client(source) as client:
        DataPathClient(client, "web01").push("c", 1, old, BS, recovery_point="old")
        assert client.delete("slave/agents/web01").status_code == 200
        added = client.post(
            "slave/agents/demand", json={"agents": [{"agentInfo": {"id": "web01"}}]}, auth=admin
        )
        assert added.status_code == 200, added.text
        DataPathClient(client, "web01").push("c", 1, new, BS, recovery_point="new")
    [entry] = bin_entries(server)
    before = snapshot(server)
    refused = server.cli("bin", "restore", str(entry["id"]))
    assert refused.status == 1 and "already has" in refused.stderr
    assert snapshot(server) == before
    assert export(server, tmp_path, "--agent", "web01", "--volume", "c") == new
    purged = server.cli("bin", "purge", "--all", "--no-gc")
    assert purged.status == 0 and bin_entries(server) == []
    assert server.cli("bin", "restore", str(entry["id"])).status == 1
