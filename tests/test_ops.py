"""Operations against a real `replicore serve`: systemd notifications, metrics, JSON logs,
status, online database backup, reload (SIGHUP) and graceful stop (SIGTERM)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import apsw
import httpx

from ops_helpers import (
    METRICS_TOML,
    NotifySocket,
    daemon_info,
    log_lines,
    scrape,
    value,
    write_server_config,
)
from pairing_helpers import pair_by_demand, request_pairing
from replicore import __version__, certs, control
from replicore import daemon as daemon_module
from replicore.config import parse as parse_config
from replicore.store import migrations

ADMIN, PASSWORD = "ops-admin", "s3cret-Pa55word-for-ops"


def add_admin(server) -> tuple[str, str]:
    result = server.cli("admin", "add", ADMIN, "--password-stdin", stdin=PASSWORD + "\n")
    assert result.status == 0, result.stderr
    return ADMIN, PASSWORD


def test_notify_socket_hears_ready_watchdog_and_stopping(make_server, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    server = make_server(METRICS_TOML, start=False)
    server.extra_env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    try:
        server.start()
        ready = notify.wait_for("READY")
        assert server.url in ready["STATUS"]
        assert notify.sender("READY") == server.proc.pid
        notify.wait_for("WATCHDOG")
        with server.client() as client:  # still serving while it pings
            assert client.get("slave/cores/noPairingSummaryInfo").status_code == 200
        assert server.stop() == 0
        assert "stopping" in notify.wait_for("STOPPING")["STATUS"]
    finally:
        notify.close()
    watchdogs = [m for m in notify.messages if m.get("WATCHDOG") == "1"]
    assert len(watchdogs) >= 1


def test_metrics_count_requests_by_route_rule(make_server):
    server = make_server(METRICS_TOML)
    with server.client() as client:
        for _ in range(3):
            assert client.get("slave/cores/noPairingSummaryInfo").status_code == 200
        assert client.get("slave/validate/", params={"useCredentials": "true"}).status_code == 401
    text = scrape(server)
    count = "replicore_http_requests_total"
    assert value(text, count, endpoint="slave/cores/noPairingSummaryInfo", method="GET",
                 status="200") == 3  # fmt: skip
    assert value(text, count, endpoint="slave/validate/", method="GET", status="401") == 1
    assert value(text, "replicore_http_request_duration_seconds_count",
                 endpoint="slave/cores/noPairingSummaryInfo", method="GET") == 3  # fmt: skip
    assert value(text, "replicore_build_info", version=__version__) == 1
    assert value(text, "replicore_disk_free_bytes") > 0
    assert value(text, "replicore_pairing_requests_pending") == 0
    assert httpx.get(daemon_info(server)["metrics"][0].replace("/metrics", "/x")).status_code == 404


def test_metrics_show_repositories_and_pending_requests(make_server, make_source):
    server = make_server(METRICS_TOML)
    assert server.cli("repository", "create", "tenant-a", "--quota", "10M").status == 0
    request_pairing(server, make_source("waiting"), ["web01"])
    text = scrape(server)
    assert (
        value(text, "replicore_repository_quota_bytes", repository="tenant-a") == 10 * 1024 * 1024
    )
    assert value(text, "replicore_repository_used_bytes", repository="tenant-a") == 0
    assert value(text, "replicore_repository_free_bytes", repository="tenant-a") == 10 * 1024 * 1024
    assert value(text, "replicore_pairing_requests_pending") == 1
    assert value(text, "replicore_sources", state="pending") == 1


def test_metrics_listener_can_be_disabled(make_server):
    server = make_server('[metrics]\nlisten = ""\n')
    assert daemon_info(server)["metrics"] == []
    status = json.loads(server.cli("status", "--json").stdout)
    assert status["daemon"]["metrics"] == []


def test_logs_are_json_lines_with_request_context_and_no_password(make_server, make_source):
    server = make_server(METRICS_TOML)
    admin = add_admin(server)
    source = make_source("logged")
    pair_by_demand(server, source, ["web01"], admin)
    with server.client() as client:
        ok = client.get("slave/validate/", params={"useCredentials": "true"}, auth=admin)
        bad = client.get("slave/validate/", params={"useCredentials": "true"},
                         auth=(ADMIN, PASSWORD + "x"))  # fmt: skip
        tagged = client.get("slave/cores/noPairingSummaryInfo", headers={"X-Request-Id": "abc-1"})
    assert (ok.status_code, bad.status_code) == (200, 401)
    assert tagged.headers["X-Request-Id"] == "abc-1"
    with server.client(source) as client:
        mine = client.get("slave/repositories")
    assert mine.status_code == 200
    server.stop()

    raw = server.log_path.read_text()
    for secret in (PASSWORD, base64.b64encode(f"{ADMIN}:{PASSWORD}".encode()).decode()):
        assert secret not in raw
    lines = log_lines(server)
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    access = [line for line in lines if line["logger"] == "replicore.access"]
    by_id = {line["request_id"]: line for line in access}
    assert by_id["abc-1"]["endpoint"] == "slave/cores/noPairingSummaryInfo"
    assert by_id[ok.headers["X-Request-Id"]]["status"] == 200
    assert by_id[bad.headers["X-Request-Id"]]["status"] == 401
    assert len(by_id) == len(access)  # every request its own id
    assert by_id[mine.headers["X-Request-Id"]]["source_core_id"] == source.core_id


def test_status_shows_daemon_and_database_facts(make_server, make_source):
    server = make_server(METRICS_TOML)
    admin = add_admin(server)
    paired = make_source("paired")
    pair_by_demand(server, paired, ["web01"], admin)
    request_pairing(server, make_source("pending"), ["db01"])
    assert server.cli("repository", "create", "quota-repo", "--quota", "1G").status == 0

    result = server.cli("status", "--json")
    assert result.status == 0, result.stderr
    status = json.loads(result.stdout)
    daemon, database = status["daemon"], status["database"]
    assert daemon["pid"] == server.proc.pid and daemon["version"] == __version__
    assert daemon["listen"] == [server.url] and daemon["uptimeSeconds"] >= 0
    assert daemon["metrics"] == daemon_info(server)["metrics"]
    assert [s["core_id"] for s in database["paired_sources"]] == [paired.core_id]
    assert database["paired_sources"][0]["agents"] == 1
    assert len(database["pending_requests"]) == 1
    repos = {r["name"]: r for r in database["repositories"]}
    assert repos["quota-repo"]["quota_bytes"] == 1024**3
    assert repos["quota-repo"]["free_bytes"] == 1024**3

    text = server.cli("status")
    assert text.status == 0
    for expected in (f"pid {server.proc.pid}", server.url, paired.core_id, "quota-repo",
                     "Pending pairing requests (1)", "Paired sources (1)"):  # fmt: skip
        assert expected in text.stdout


def test_status_without_a_running_daemon_exits_3_and_shows_the_database(make_server):
    server = make_server(METRICS_TOML)
    assert server.cli("repository", "create", "kept").status == 0
    assert server.stop() == 0
    result = server.cli("status")
    assert result.status == 3
    assert "not running" in result.stdout and "kept" in result.stdout


def test_control_socket_is_private_and_answers_json(make_server):
    server = make_server(METRICS_TOML)
    path = Path(daemon_info(server)["control"])
    assert path == server.state_dir / "control.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(server.database_path.stat().st_mode) == 0o600
    assert control.query(path)["pid"] == server.proc.pid
    answer = control.query(path, "no-such-command")
    assert answer["ok"] is False and "status" in answer["commands"]
    assert server.stop() == 0
    assert not path.exists()


def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(make_server):
    server = make_server(METRICS_TOML)
    second = subprocess.run(
        [sys.executable, "-m", "replicore", "serve", "--config", str(server.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "another replicore daemon is running" in second.stderr
    with server.client() as client:
        assert client.get("slave/cores/noPairingSummaryInfo").status_code == 200


def test_a_stale_control_socket_of_a_killed_daemon_is_replaced(make_server):
    server = make_server(METRICS_TOML)
    server.kill()
    assert (server.state_dir / "control.sock").exists()
    server.start()
    assert control.query(server.state_dir / "control.sock")["pid"] == server.proc.pid


def test_backup_db_while_the_daemon_writes_is_consistent(make_server, tmp_path):
    server = make_server(METRICS_TOML)
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        conn = apsw.Connection(str(server.database_path))
        conn.set_busy_timeout(15000)
        while not stop.is_set():
            with conn:
                conn.execute(
                    "INSERT INTO repositories(name, quota_bytes, created_at) VALUES (?, ?, ?)",
                    (f"busy-{written[0]}", None, time.time()),
                )
            written[0] += 1
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while written[0] < 20:
            time.sleep(0.01)
        output = tmp_path / "copy.db"
        result = server.cli("backup-db", "-o", str(output))
    finally:
        stop.set()
        thread.join()
    assert result.status == 0, result.stderr
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    copy = apsw.Connection(str(output), flags=apsw.SQLITE_OPEN_READONLY)
    live = apsw.Connection(str(server.database_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        assert copy.execute(schema).fetchall() == live.execute(schema).fetchall()
        copied = copy.execute("SELECT count(*) FROM repositories").fetchone()[0]
        assert 20 <= copied <= written[0]
        names = {r[0] for r in copy.execute("SELECT name FROM repositories")}
        assert names == {f"busy-{i}" for i in range(copied)}  # a prefix: one snapshot
    finally:
        copy.close()
        live.close()
    again = server.cli("backup-db", "-o", str(output))
    assert again.status == 2 and "--force" in again.stderr
    assert server.cli("backup-db", "-o", str(output), "--force").status == 0


def test_serve_copies_the_database_before_a_migration_changes_it(tmp_path, monkeypatch):
    config = parse_config({"server": {"state_dir": str(tmp_path / "state")}})
    daemon_module.prepare_state(config)
    assert not (tmp_path / "state" / "backups").exists()  # a new database needs no copy
    old = migrations.LATEST
    step = (old + 1, "test: one more table", ["CREATE TABLE ops_test_step (x INTEGER) STRICT;"])
    monkeypatch.setattr(migrations, "STEPS", [*migrations.STEPS, step])
    monkeypatch.setattr(migrations, "LATEST", old + 1)
    daemon_module.prepare_state(config)
    (copy,) = (tmp_path / "state" / "backups").iterdir()
    assert copy.name.startswith(f"replicore-schema{old}-")
    conn = apsw.Connection(str(copy), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == old
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "ops_test_step" not in tables and "repositories" in tables
    finally:
        conn.close()
    daemon_module.prepare_state(config)  # up to date: no second copy
    assert len(list((tmp_path / "state" / "backups").iterdir())) == 1


def _tls_config(server, tls_dir: Path) -> None:
    certs.ensure_server_certificate(tls_dir)
    write_server_config(
        server,
        f'tls_cert = "{tls_dir / "server.crt"}"\ntls_key = "{tls_dir / "server.key"}"\n',
    )


def _peer_fingerprint(url: str) -> str:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, int(port))) as raw, context.wrap_socket(raw) as tls:
        return certs.fingerprint_der(tls.getpeercert(binary_form=True))


def _wait_for_fingerprint(server, old: str) -> str:
    deadline = time.monotonic() + 30
    while (new := daemon_info(server)["fingerprint"]) == old:
        assert time.monotonic() < deadline, "the daemon did not reload"
        time.sleep(0.05)
    return new


def test_sighup_reloads_the_certificate_without_dropping_connections(make_server, tmp_path):
    server = make_server(start=False)
    tls_dir = tmp_path / "tls"
    _tls_config(server, tls_dir)
    server.start()
    old = server.fingerprint
    context = ssl.create_default_context(cadata=server.pem)
    context.check_hostname = False
    host, port = server.url.removeprefix("https://").rsplit(":", 1)
    path = "/apprecovery/api/core/replicationcomms/slave/cores/noPairingSummaryInfo"
    kept = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    kept.request("GET", path)
    assert kept.getresponse().read() and kept.sock is not None
    sock_before = kept.sock

    fresh = tmp_path / "fresh"
    certs.ensure_server_certificate(fresh)
    for name in ("server.crt", "server.key"):
        shutil.copy(fresh / name, tls_dir / name)
    server.proc.send_signal(signal.SIGHUP)
    new = _wait_for_fingerprint(server, old)
    assert new == certs.file_fingerprint(fresh / "server.crt") != old

    kept.request("GET", path)  # the connection opened before the reload still works
    answer = kept.getresponse()
    assert answer.status == 200 and kept.sock is sock_before
    assert json.loads(answer.read())["serverCertificateFingerprint"] == new
    kept.close()
    assert _peer_fingerprint(server.url) == new  # new handshakes get the new certificate
    assert server.proc.poll() is None


def test_reload_refuses_a_bad_config_or_key_and_keeps_serving(make_server, tmp_path):
    server = make_server(start=False)
    tls_dir = tmp_path / "tls"
    _tls_config(server, tls_dir)
    server.start()
    sock = server.state_dir / "control.sock"
    good = server.config_path.read_text()

    server.config_path.write_text(good + "\n[log]\nlevel = 'loud'\n")
    answer = control.query(sock, "reload")
    assert answer["reloaded"] is False and "log.level" in answer["error"]

    server.config_path.write_text(good)
    other = tmp_path / "other"
    certs.ensure_server_certificate(other)
    shutil.copy(other / "server.key", tls_dir / "server.key")  # key of another certificate
    answer = control.query(sock, "reload")
    assert answer["reloaded"] is False and answer["error"].startswith("certificate")
    assert _peer_fingerprint(server.url) == server.fingerprint

    server.config_path.write_text(
        good.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:1"', 1)
    )
    shutil.copy(other / "server.crt", tls_dir / "server.crt")
    answer = control.query(sock, "reload")
    assert answer["reloaded"] is True and answer["needRestart"] == ["server.listen"]
    assert answer["certificateChanged"] is True
    assert _peer_fingerprint(server.url) == answer["fingerprint"]


def test_sigterm_cuts_a_stuck_request_and_exits_0_within_the_shutdown_timeout(
    make_server, tmp_path
):
    notify = NotifySocket(tmp_path / "notify.sock")
    server = make_server(start=False)
    write_server_config(server, "shutdown_timeout = 1.0")
    server.extra_env = {"NOTIFY_SOCKET": str(notify.path)}
    server.start()
    context = ssl.create_default_context(cadata=server.pem)
    context.check_hostname = False
    host, port = server.url.removeprefix("https://").rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=30)
    stuck = context.wrap_socket(raw)
    stuck.sendall(
        b"POST /apprecovery/api/core/replicationcomms/slave/pairing/request HTTP/1.1\r\n"
        b'Host: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"pa'
    )
    idle = httpx.Client(verify=context, base_url=server.url)
    idle.get("/apprecovery/api/core/replicationcomms/slave/cores/noPairingSummaryInfo")
    try:
        wait_until_in_flight(server.state_dir / "control.sock")
        assert server.stop(timeout=60) == 0
        notify.wait_for("STOPPING")
        try:
            rest = stuck.recv(65536)
        except (ssl.SSLError, OSError):
            rest = b""
        assert b"200" not in rest.split(b"\r\n", 1)[0]  # never answered as a success
    finally:
        stuck.close()
        idle.close()
        notify.close()
    assert "stopped" in server.log_path.read_text()


def wait_until_in_flight(sock: Path) -> None:
    deadline = time.monotonic() + 30
    while control.query(sock)["requestsInProgress"] < 1:
        assert time.monotonic() < deadline, "the stuck request never started"
        time.sleep(0.05)


def test_metrics_after_a_push_show_the_bytes_pushed(make_server, make_source, tmp_path, capsys):
    from replicore.cli import main as cli_main

    server = make_server(METRICS_TOML)
    admin = add_admin(server)
    source = make_source("pusher")
    pair_by_demand(server, source, ["web01"], admin)
    image = tmp_path / "disk.img"
    block = 64 * 1024
    image.write_bytes(b"".join(os.urandom(block // 2) * 2 for _ in range(16)) + bytes(block * 4))
    before = scrape(server)
    capsys.readouterr()
    volume = f"vol1={image}"
    status = cli_main(["push", "--target", server.url, "--agent", "web01", "--volume", volume,
                       "--dir", str(source.directory), "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    figures = json.loads(out.strip().splitlines()[-1])
    after = scrape(server)
    received = value(after, "replicore_received_bytes_total") - value(
        before, "replicore_received_bytes_total"
    )
    records = value(after, "replicore_received_records_total") - value(
        before, "replicore_received_records_total"
    )
    assert records == figures["records_sent"] > 0
    assert 0 < received <= figures["wire_bytes"]
    assert value(after, "replicore_sessions_committed_total") >= 1
    session_id = figures["volumes"][0]["session_id"]
    uploads = [
        line for line in log_lines(server) if line.get("endpoint", "").endswith("/records/rawdata")
    ]
    assert uploads, "no access line for records/rawdata"
    for line in uploads:
        assert (line["agent_id"], line["session_id"]) == ("web01", session_id)
        assert line["source_core_id"] == source.core_id


def _push(server, source, image: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "replicore", "push", "--target", server.url, "--agent", "web01",
         "--volume", f"vol1={image}", "--dir", str(source.directory), "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_sigterm_during_a_push_commits_nothing_half_done_and_the_push_resumes(
    make_server, make_source, tmp_path
):
    server = make_server(start=False)
    write_server_config(server, "shutdown_timeout = 1.0")
    server.start()
    source = make_source("cut")
    pair_by_demand(server, source, ["web01"], add_admin(server))
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(6 * 1024 * 1024))

    slow = _push(server, source, image, "--max-rate", "512K", "--streams", "1")
    try:
        deadline = time.monotonic() + 60
        sock = server.state_dir / "control.sock"
        while control.query(sock)["uploadsInProgress"] < 1:
            assert slow.poll() is None, slow.communicate()
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
        assert server.stop(timeout=60) == 0
        if slow.poll() is None:  # still retrying against the stopped target
            slow.kill()
        assert slow.wait(60) != 0  # cut, not finished
    finally:
        if slow.poll() is None:
            slow.kill()
        slow.communicate()
    conn = apsw.Connection(str(server.database_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    export = tmp_path / "export.img"
    nothing = server.cli("export", "--agent", "web01", "--volume", "vol1", "-o", str(export))
    assert nothing.status != 0  # no image became visible half-done

    server.start()  # a new port: point the source's saved target at it
    record = json.loads(source.target_path(server.core_id).read_text())
    source.save_target({**record, "url": server.url})
    again = _push(server, source, image)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, out + err
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["resumed_run"] is True or figures["records_sent"] < 96
    done = server.cli("export", "--agent", "web01", "--volume", "vol1", "-o", str(export))
    assert done.status == 0, done.stderr
    assert export.read_bytes() == image.read_bytes()
