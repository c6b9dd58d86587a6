"""The console's pieces without a server: session rows and their expiry, usage samples, the
source pause, the chart geometry, the template filters and the login redirect check."""

from __future__ import annotations

import hashlib
from pathlib import Path

import apsw
import pytest

from replicore.config import ConsoleConfig
from replicore.console import charts, formatting, security
from replicore.errors import Conflict
from replicore.store import admins, console_sessions, db, migrations, overview, usage_history
from replicore.store.db import transaction

DAY = 86400.0


@pytest.fixture
def conn(tmp_path: Path) -> apsw.Connection:
    path = tmp_path / "replicore.db"
    connection = db.connect(path, create=True)
    migrations.apply(connection, path)
    with transaction(connection):
        admins.add(connection, "admin", "correct horse battery")
    return connection


def add_core(conn: apsw.Connection, core_id: str, state: str = "approved", customer: str = ""):
    with transaction(conn):
        conn.execute(
            "INSERT INTO master_cores(core_id, fingerprint, certificate, state, method,"
            " requested_at, customer_id, host_name) VALUES (?, ?, '', ?, 'demand', 0, ?, ?)",
            (core_id, f"fp-{core_id}", state, customer, f"{core_id}.example"),
        )
        return conn.last_insert_rowid()


def token_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def new_session(conn: apsw.Connection, token: str, now: float, ttl: float = 100.0) -> int:
    with transaction(conn):
        return console_sessions.create(
            conn,
            token_hash(token),
            "admin",
            client_address="127.0.0.1",
            user_agent="test",
            now=now,
            ttl=ttl,
            idle_timeout=30.0,
        )


def test_a_session_is_found_until_its_lifetime_or_idle_timeout_ends(conn):
    new_session(conn, "a", now=1000.0, ttl=100.0)
    assert console_sessions.find(conn, token_hash("a"), 1020.0, 30.0) is not None
    assert console_sessions.find(conn, token_hash("a"), 1031.0, 30.0) is None  # idle
    found = console_sessions.find(conn, token_hash("a"), 1020.0, 30.0)
    with transaction(conn):
        console_sessions.touch(conn, found["id"], 1025.0)
    assert console_sessions.find(conn, token_hash("a"), 1050.0, 30.0) is not None
    assert console_sessions.find(conn, token_hash("a"), 1100.0, 300.0) is None  # lifetime
    assert console_sessions.find(conn, token_hash("b"), 1020.0, 30.0) is None


def test_logging_in_deletes_expired_sessions_and_logout_ends_one(conn):
    new_session(conn, "old", now=1000.0, ttl=10.0)
    new_session(conn, "new", now=2000.0)
    assert conn.execute("SELECT count(*) FROM console_sessions").fetchone()[0] == 1
    with transaction(conn):
        assert console_sessions.end(conn, token_hash("new"))["admin_name"] == "admin"
        assert console_sessions.end(conn, token_hash("new")) is None


def test_removing_an_administrator_deletes_their_sessions(conn):
    new_session(conn, "a", now=1000.0)
    with transaction(conn):
        admins.remove(conn, "admin")
    assert conn.execute("SELECT count(*) FROM console_sessions").fetchone()[0] == 0


def test_a_session_needs_an_existing_administrator(conn):
    with pytest.raises(apsw.ConstraintError), transaction(conn):
        console_sessions.create(
            conn,
            token_hash("x"),
            "nobody",
            client_address="",
            user_agent="",
            now=0.0,
            ttl=1.0,
            idle_timeout=1.0,
        )


def test_usage_samples_add_up_per_customer_and_old_ones_are_dropped(conn):
    one = add_core(conn, "one", customer="ACME")
    two = add_core(conn, "two", customer="ACME")
    three = add_core(conn, "three")
    now = 100 * DAY * 10
    measured = [
        {"core_pk": one, "customer_id": "ACME", "stored_bytes": 10},
        {"core_pk": two, "customer_id": "ACME", "stored_bytes": 5},
        {"core_pk": three, "customer_id": "", "stored_bytes": 7},
        {"core_pk": 999, "customer_id": "gone", "stored_bytes": 1},
    ]
    with transaction(conn):
        usage_history.record(conn, [{**measured[0], "stored_bytes": 1}], now - 800 * DAY)
        assert usage_history.record(conn, measured, now - DAY) == 3
        usage_history.record(conn, measured[:1], now)
    series = usage_history.per_customer(conn, now - 10 * DAY, now + 1)
    assert series == {
        "ACME": [[now - DAY, 15], [now, 10]],
        "source three.example (no customer id)": [[now - DAY, 7]],
    }
    assert conn.execute("SELECT min(at) FROM usage_samples").fetchone()[0] == now - DAY
    assert usage_history.last_sample_at(conn) == now


def test_a_source_is_paused_only_while_paired(conn):
    paired = add_core(conn, "paired")
    denied = add_core(conn, "denied", state="denied")
    with transaction(conn):
        assert overview.set_source_pause(conn, paired, True)["paused"] == 1
        assert overview.set_source_pause(conn, paired, False)["paused"] == 0
    with pytest.raises(Conflict, match="denied, not paired"), transaction(conn):
        overview.set_source_pause(conn, denied, True)


def test_chart_steps_are_round_numbers_of_binary_units():
    assert charts.nice_step(5.3 * 1024**3) == 2 * 1024**3
    assert charts.nice_step(800 * 1024**2) == 200 * 1024**2
    assert charts.nice_step(0) == 1.0


def test_chart_keeps_the_last_sample_of_each_bucket():
    points = [[float(i), float(i)] for i in range(1000)]
    drawn = charts.downsample(points, 0.0, 1000.0)
    assert len(drawn) <= charts.MAX_POINTS + 1 and drawn[-1] == [999.0, 999.0]
    assert charts.downsample([[1.0, 1.0], [1.5, 2.0]], 0.0, 2400.0) == [[1.5, 2.0]]


def test_chart_maps_samples_inside_the_plot():
    chart = charts.line_chart({"a": [[0.0, 0.0], [100.0, 50.0]]}, 0.0, 100.0)
    (line,) = chart.lines
    (x0, y0), (x1, y1) = line.dots
    assert (x0, y0) == (chart.left, chart.bottom)
    assert x1 == chart.right and chart.top <= y1 < chart.bottom
    assert not chart.empty and chart.y_ticks[0][1] == "0"
    assert charts.line_chart({}, 0.0, 100.0).empty


def test_filters_format_sizes_times_and_commands():
    assert formatting.size(None) == "-"
    assert formatting.size(512) == "512 B"
    assert formatting.size(1536 * 1024**2) == "1.5 GiB"
    assert formatting.ago(1000.0, now=1000.0 + 3 * 3600 + 120) == "3 h 2 min ago"
    assert formatting.ago(1000.0 + 86400 * 2, now=1000.0).startswith("in 2 d")
    assert formatting.when("2026-11-27T10:00:00Z") == "2026-11-27 10:00 UTC"
    assert formatting.command(["replicore", "export", "--agent", "a b"]) == (
        "replicore export --agent 'a b'"
    )


def test_after_login_only_paths_inside_the_console_are_followed():
    config = ConsoleConfig()
    assert security.safe_next("/apprecovery/admin/jobs", config) == "/apprecovery/admin/jobs"
    for target in (
        "https://evil.example/",
        "//evil.example/apprecovery/admin/",
        "/apprecovery/adminx",
        "/apprecovery/admin/\\evil",
        "/other",
        "",
        None,
    ):
        assert security.safe_next(target, config) is None


def test_csrf_token_is_bound_to_the_session_token():
    token = security.new_token()
    assert security.csrf_for(token) == security.csrf_for(token) != security.csrf_for("b")
    assert token not in security.csrf_for(token) and len(security.csrf_for(token)) == 64
    assert security.same("x", "x") and not security.same(None, "x") and not security.same("y", "x")
