"""Billing: sources' storage usage reports (`PUT slave/storage`) are stored with their time,
and `replicore billing report` gives per source and agent the protected bytes over the month
(time-weighted average and peak), the bytes stored here (unique and shared, adding up to what
the repository holds) and recovery points, in table, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import random
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import apsw
import pytest

from datapath_helpers import KIB, DataPathClient, key_entries, make_image, mutate, split
from pairing_helpers import db_snapshot, pair_by_demand
from replicore import protocol
from replicore.store import billing, db, migrations

BS = 4 * KIB


def report_body(**agents: int) -> dict[str, Any]:
    return {
        "agents": [
            {
                "id": agent,
                "displayName": agent.upper(),
                "hostName": f"{agent}.example",
                "recoveryPointCount": 3,
                "oldestRpTimestamp": "2026-11-01T00:00:00Z",
                "newestRpTimestamp": "2026-11-27T10:00:00Z",
                "totalBytesProtected": protected,
            }
            for agent, protected in agents.items()
        ],
        "repositories": [{"id": "repo-1", "name": "Main", "bytesUsed": 10, "bytesFree": 90}],
    }


def billing_json(server: Any, *args: str) -> dict[str, Any]:
    result = server.cli("billing", "report", "--format", "json", *args)
    assert result.status == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def query(server: Any, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = apsw.Connection(str(server.database_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


@pytest.fixture
def paired(server: Any, make_source: Any, admin: Any) -> Any:
    source = make_source("alpha")
    pair_by_demand(server, source, ["web01", "db01"], admin)
    return source


# --- PUT slave/storage ---------------------------------------------------------------------


def test_storage_report_is_stored_with_its_time(server, paired):
    with server.client(paired) as client:
        response = client.put("slave/storage", json=report_body(web01=1000, db01=2000))
    assert response.status_code == 204 and response.content == b""
    stored = query(
        server,
        "SELECT a.agent_id, a.bytes_protected, a.recovery_point_count, a.newest_rp_at,"
        " r.received_at FROM storage_report_agents a"
        " JOIN storage_reports r ON r.id = a.report_pk ORDER BY a.agent_id",
    )
    assert [(s[0], s[1], s[2]) for s in stored] == [("db01", 2000, 3), ("web01", 1000, 3)]
    assert stored[0][3] == datetime(2026, 11, 27, 10, tzinfo=UTC).timestamp()
    assert stored[0][4] > 1.7e9
    assert query(
        server,
        "SELECT repository_id, name, bytes_used, bytes_free FROM storage_report_repositories",
    ) == [("repo-1", "Main", 10, 90)]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{", 400, None),
        ({"agents": "none"}, 422, "agents"),
        ({"agents": [{"id": "web01"}]}, 422, "agents[0].totalBytesProtected"),
        (
            {"agents": [{"id": "web01", "totalBytesProtected": -5}]},
            422,
            "agents[0].totalBytesProtected",
        ),
        (
            {"agents": [{"id": "web01", "totalBytesProtected": 2**63}]},  # over SQLite's INTEGER
            422,
            "agents[0].totalBytesProtected",
        ),
        (
            {
                "agents": [
                    {"id": "web01", "totalBytesProtected": 1, "newestRpTimestamp": "yesterday"}
                ]
            },
            422,
            "agents[0].newestRpTimestamp",
        ),
        (
            {
                "agents": [
                    {"id": "a", "totalBytesProtected": 1},
                    {"id": "a", "totalBytesProtected": 2},
                ]
            },
            422,
            "agents[1].id",
        ),
        (
            {"agents": [], "repositories": [{"id": "r", "bytesUsed": 1}]},
            422,
            "repositories[0].bytesFree",
        ),
    ],
)
def test_bad_storage_report_is_refused_and_changes_nothing(server, paired, body, status, field):
    before = db_snapshot(server)
    with server.client(paired) as client:
        if isinstance(body, bytes):
            response = client.put("slave/storage", content=body)
        else:
            response = client.put("slave/storage", json=body)
    assert response.status_code == status, response.text
    assert response.json().get("field") == field
    assert db_snapshot(server) == before


def test_unpaired_callers_cannot_report(server):
    with server.client() as client:
        assert client.put("slave/storage", json=report_body(web01=1)).status_code == 401


# --- the monthly report --------------------------------------------------------------------


def test_protected_bytes_are_weighted_by_time():
    samples = [(0.0, {"a": 100}), (10.0, {"a": 300, "b": 50}), (30.0, {"b": 50})]
    result = billing.protected_over(samples, 5.0, 40.0)
    # a: 100 for 5 s, 300 for 20 s, 0 for 10 s; b: 0 for 5 s, 50 for 30 s (over 35 s).
    assert result["a"] == {"average": round(6500 / 35), "peak": 300, "latest": 0, "reports": 1}
    assert result["b"] == {"average": round(1500 / 35), "peak": 50, "latest": 50, "reports": 2}
    later = billing.protected_over(samples, 20.0, 40.0)
    assert later["a"] == {"average": 150, "peak": 300, "latest": 0, "reports": 0}
    assert billing.protected_over(samples, 50.0, 60.0)["b"]["average"] == 50
    assert billing.protected_over(samples[1:], 0.0, 5.0) == {}


def test_month_bounds_are_utc_months():
    start, end = billing.month_bounds("2026-02")
    assert end - start == 28 * 86400
    with pytest.raises(ValueError):
        billing.month_bounds("2026-13")
    with pytest.raises(ValueError):
        billing.month_bounds("26-1")


def test_shared_records_are_split_in_whole_bytes_that_add_up(tmp_path: Path):
    path = tmp_path / "unit.db"
    conn = db.connect(path, create=True)
    migrations.apply(conn, path)
    key = [bytes([i]) * 32 for i in range(3)]
    with db.transaction(conn):
        conn.execute(
            "INSERT INTO repositories(id, name, created_at) VALUES (1, 'r', 0);"
            "INSERT INTO master_cores(id, core_id, fingerprint, certificate, state, method,"
            " requested_at) VALUES (1, 'c', 'f', 'pem', 'approved', 'demand', 0);"
            "INSERT INTO agents(id, core_pk, agent_id, state, repository_id, created_at)"
            " VALUES (1, 1, 'a1', 'approved', 1, 0), (2, 1, 'a2', 'approved', 1, 0),"
            " (3, 1, 'a3', 'approved', 1, 0)"
        )
        for pk, (k, length) in enumerate([(key[0], 10), (key[1], 7), (key[2], 5)], start=1):
            conn.execute(
                "INSERT INTO records(id, repository_id, key, raw_length, codec, stored_length,"
                " data, created_at) VALUES (?, 1, ?, ?, 0, ?, ?, 0)",
                (pk, k, length, length, b"x" * length),
            )
        for agent in (1, 2, 3):
            conn.execute(
                "INSERT INTO recovery_points(id, agent_pk, recovery_point_id, timestamp,"
                " volume_count, complete, created_at) VALUES (?, ?, 'rp', 't', 1, 1, 0)",
                (agent, agent),
            )
            conn.execute(
                "INSERT INTO volume_images(id, agent_pk, recovery_point_pk, repository_id,"
                " driver_volume_id, epoch_number, block_size, size, block_count,"
                " stored_block_count, keys_checksum, session_id, job_id, committed_at)"
                " VALUES (?, ?, ?, 1, 'v', 1, 4096, 4096, 1, 1, '', 's', 'j', 0)",
                (agent, agent, agent),
            )
        # key 0 (10 bytes) shared by all three, key 1 (7 bytes) only a1's; key 2 unreferenced.
        conn.execute(
            "INSERT INTO image_blocks(image_id, block_index, key) VALUES"
            " (1, 0, ?), (2, 0, ?), (3, 0, ?), (1, 1, ?), (1, 2, ?)",
            (key[0], key[0], key[0], key[1], key[1]),
        )
    per_agent, per_repository = billing.stored_bytes(conn)
    conn.close()
    assert per_agent[1] == {"unique": 7, "shared": 4, "records": 2}
    assert per_agent[2] == {"unique": 0, "shared": 3, "records": 1}
    assert per_agent[3] == {"unique": 0, "shared": 3, "records": 1}
    assert per_repository[1] == {"stored": 22, "attributed": 17}


def test_billing_report_sums_match_what_was_stored(server, make_source, admin, tmp_path):
    alpha, beta = make_source("alpha"), make_source("beta")
    answer = pair_by_demand(server, alpha, ["web01", "db01"], admin)
    repository = answer["agents"][0]["repositoryName"]
    pair_by_demand(server, beta, ["app01"], admin, repository=repository)
    web_image = make_image(1, 24 * BS, BS)
    db_image = mutate(web_image, BS, range(0, 24, 3), seed=2)  # shares 2/3 of web01's blocks
    app_image = make_image(3, 8 * BS, BS) + web_image[: 8 * BS]  # another source, shared
    with server.client(alpha) as client:
        web = DataPathClient(client, "web01")
        web.push("vol-w", 1, web_image, BS)
        web.push("vol-w", 2, mutate(web_image, BS, [5], seed=9), BS, previous=1)
        DataPathClient(client, "db01").push("vol-d", 1, db_image, BS)
        client.put("slave/storage", json=report_body(web01=5000, db01=7000, gone01=100))
        client.put("slave/storage", json=report_body(web01=9000, db01=7000))
    with server.client(beta) as client:
        app = DataPathClient(client, "app01")
        app.push("vol-a", 1, app_image, BS)
        # Records sent in a session never committed: stored, but no image holds them.
        stray = random.Random(4).randbytes(2 * BS)
        opened = app.open_ok("vol-x", 1, len(stray), BS)
        missing = app.missing(opened["sessionId"], key_entries(split(stray, BS)))
        app.send_records(opened["sessionId"], split(stray, BS), missing)
        client.put("slave/storage", json=report_body(web01=123456))  # beta's own "web01"

    result = billing_json(server)

    # What each agent's images reference, from the blocks we pushed.
    images = {
        "web01": [web_image, mutate(web_image, BS, [5], seed=9)],
        "db01": [db_image],
        "app01": [app_image],
    }
    keys = {
        agent: {protocol.record_key(b) for image in imgs for b in split(image, BS)}
        for agent, imgs in images.items()
    }
    length = dict(query(server, "SELECT key, stored_length FROM records"))
    holders: dict[bytes, int] = defaultdict(int)
    for held in keys.values():
        for k in held:
            holders[k] += 1
    agents = {
        a["agentId"]: a for s in result["sources"] for a in s["agents"] if a["replicatedHere"]
    }
    for agent, held in keys.items():
        unique = sum(length[k] for k in held if holders[k] == 1)
        assert agents[agent]["storedUniqueBytes"] == unique, agent
        shared = sum(length[k] / holders[k] for k in held if holders[k] > 1)
        assert abs(agents[agent]["storedSharedBytes"] - shared) < 1, agent
    total_stored = sum(length.values())
    (repo,) = [r for r in result["repositories"] if r["name"] == repository]
    assert repo["storedBytes"] == total_stored
    attributed = sum(a["storedBytes"] for a in agents.values())
    assert attributed == sum(length[k] for k in holders)
    assert repo["attributedBytes"] == attributed
    assert repo["unattributedBytes"] == sum(length[k] for k in length if k not in holders) > 0
    assert (agents["web01"]["recoveryPoints"], agents["db01"]["recoveryPoints"]) == (2, 1)
    assert agents["app01"]["recoveryPoints"] == 1

    by_source = {s["coreId"]: s for s in result["sources"]}
    alpha_agents = {a["agentId"]: a for a in by_source[alpha.core_id]["agents"]}
    assert alpha_agents["web01"]["protectedBytesPeak"] == 9000
    assert alpha_agents["web01"]["protectedBytesLatest"] == 9000
    assert 5000 <= alpha_agents["web01"]["protectedBytesAverage"] <= 9000
    assert alpha_agents["db01"]["protectedBytesAverage"] == 7000
    assert alpha_agents["gone01"]["replicatedHere"] is False
    assert alpha_agents["gone01"]["protectedBytesLatest"] == 0
    assert alpha_agents["web01"]["reportedRecoveryPoints"] == 3
    beta_agents = {a["agentId"]: a for a in by_source[beta.core_id]["agents"]}
    assert beta_agents["web01"]["protectedBytesPeak"] == 123456  # beta's, not alpha's
    assert beta_agents["web01"]["storedBytes"] == 0
    assert by_source[alpha.core_id]["totals"]["storedBytes"] == (
        alpha_agents["web01"]["storedBytes"] + alpha_agents["db01"]["storedBytes"]
    )

    table = server.cli("billing", "report")
    assert table.status == 0 and "web01" in table.stdout and "app01" in table.stdout
    assert "held by no committed image" in table.stdout
    csv_out = server.cli("billing", "report", "--format", "csv", "--month", result["month"])
    parsed = list(csv.DictReader(io.StringIO(csv_out.stdout)))
    row = next(r for r in parsed if r["agent_id"] == "db01")
    assert int(row["stored_bytes"]) == agents["db01"]["storedBytes"]
    assert row["core_id"] == alpha.core_id and row["month"] == result["month"]


def test_billing_report_of_other_months(server, paired):
    with server.client(paired) as client:
        client.put("slave/storage", json=report_body(web01=1000))
    past = billing_json(server, "--month", "2020-01")
    (source,) = past["sources"]
    web = next(a for a in source["agents"] if a["agentId"] == "web01")
    assert web["protectedBytesAverage"] is None and web["reportsInMonth"] == 0
    future = server.cli("billing", "report", "--month", "2999-01")
    bad = server.cli("billing", "report", "--month", "January")
    assert future.status == 2 and "has not begun" in future.stderr
    assert bad.status == 2 and "YYYY-MM" in bad.stderr
