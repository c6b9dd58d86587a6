"""Operations pieces without a server: the sd_notify sender, log formatting and redaction,
the metrics registry and its listener app."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import uuid

import trio

from ops_helpers import value
from replicore import logs, metrics
from replicore.notify import Notifier


def test_notifier_sends_one_datagram_to_an_abstract_socket():
    name = f"replicore-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(b"\0" + name.encode())
        listener.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.ready(status="serving on\nhttps://x")
        assert listener.recv(4096) == b"READY=1\nSTATUS=serving on https://x"
        assert notifier.stopping()
        assert listener.recv(4096) == b"STOPPING=1"


def test_notifier_without_notify_socket_does_nothing():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.watchdog_interval is None


def test_notifier_to_a_missing_socket_reports_failure_without_raising(tmp_path):
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process():
    env = {"NOTIFY_SOCKET": "/run/x.sock", "WATCHDOG_USEC": "30000000"}
    assert Notifier(env).watchdog_interval == 15.0
    mine = {**env, "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 15.0


def test_watchdog_pid_of_the_parent_counts_only_in_a_frozen_executable():
    env = {"NOTIFY_SOCKET": "/run/x.sock", "WATCHDOG_USEC": "1000000"}
    parent = {**env, "WATCHDOG_PID": str(os.getppid())}
    assert Notifier(parent, frozen=True).watchdog_interval == 0.5
    assert Notifier(parent, frozen=False).watchdog_interval is None
    other = {**env, "WATCHDOG_PID": "1"}
    assert Notifier(other, frozen=True).watchdog_interval is None
    assert Notifier({**env, "WATCHDOG_USEC": "0"}).watchdog_interval is None


async def test_watchdog_loop_pings_at_the_interval(tmp_path, autojump_clock):
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.setblocking(False)
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
        with trio.move_on_after(3.5):  # pings at 0, 1, 2, 3
            await notifier.watchdog_loop()
        pings = []
        while True:
            try:
                pings.append(listener.recv(64))
            except BlockingIOError:
                break
    assert pings == [b"WATCHDOG=1"] * 4


def _format(message: str, *args: object, **extra: object) -> dict[str, object]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(f"replicore.test.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.warning(message, *args, extra=extra or None)
    result: dict[str, object] = json.loads(stream.getvalue())
    return result


def test_log_lines_are_json_with_the_bound_context():
    with logs.bound(request_id="r-1", agent_id="web01"):
        line = _format("hello %s", "world", data={"bytes": 5})
    assert list(line)[:4] == ["ts", "level", "logger", "msg"]
    assert line["msg"] == "hello world" and line["level"] == "warning"
    assert (line["request_id"], line["agent_id"], line["bytes"]) == ("r-1", "web01", 5)
    assert "session_id" not in line
    assert "request_id" not in _format("outside")


def test_secrets_never_reach_a_log_line():
    pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----"
    line = _format(
        "header Authorization: Basic YWRtaW46c2VjcmV0 and password=hunter2 and %s", pem,
        data={"password": "hunter2", "nested": {"api_key": "k"}, "user": "admin"},
    )  # fmt: skip
    text = json.dumps(line)
    for secret in ("YWRtaW46c2VjcmV0", "hunter2", "MIIEvQIBADANBg", '"k"'):
        assert secret not in text
    assert line["user"] == "admin" and line["password"] == logs.REDACTED


def test_log_exceptions_carry_their_traceback():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("replicore.test.exc")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    line = json.loads(stream.getvalue())
    assert "ValueError: boom" in line["exc"] and line["level"] == "error"


def test_metrics_render_counters_and_database_facts():
    before = metrics.render(None)[0].decode()
    metrics.record_received(1000, 2, raw_nbytes=4000)
    metrics.record_deduplicated(65536)
    metrics.record_rejected(10, reason="mismatch")
    metrics.session_discarded("timeout")
    with metrics.uploading():
        during = metrics.render(None)[0].decode()
    facts = metrics.Facts(
        repositories=[metrics.RepositoryUsage("r1", 5, 100, 95)],
        sources_by_state={"pending": 2},
        counts={"sessions_open": 3},
    )
    text, content_type = metrics.render(facts)
    text = text.decode()
    assert content_type.startswith("text/plain")

    def grew(name: str, by: float, **labels: str) -> bool:
        return (value(text, name, **labels) or 0) - (value(before, name, **labels) or 0) == by

    assert grew("replicore_received_bytes_total", 1000)
    assert grew("replicore_received_records_total", 2)
    assert grew("replicore_received_uncompressed_bytes_total", 4000)
    assert grew("replicore_deduplicated_bytes_total", 65536)
    assert grew("replicore_rejected_records_total", 1, reason="mismatch")
    assert grew("replicore_sessions_discarded_total", 1, reason="timeout")
    assert value(during, "replicore_uploads_in_progress") == 1
    assert value(text, "replicore_uploads_in_progress") == 0
    assert value(text, "replicore_repository_free_bytes", repository="r1") == 95
    assert value(text, "replicore_pairing_requests_pending") == 2
    assert value(text, "replicore_sessions_open") == 3


async def test_metrics_app_answers_get_head_and_refuses_the_rest():
    async def read() -> metrics.Facts:
        return metrics.Facts()

    app = metrics.asgi_app(read)

    async def call(method: str, path: str) -> tuple[int, bytes]:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": method, "path": path, "headers": []}
        await app(scope, receive, send)
        return int(sent[0]["status"]), bytes(sent[1]["body"])  # type: ignore[call-overload]

    status, body = await call("GET", "/metrics")
    assert status == 200 and b"replicore_build_info" in body
    assert await call("HEAD", "/metrics") == (200, b"")
    assert (await call("POST", "/metrics"))[0] == 405
    assert (await call("GET", "/other"))[0] == 404


def test_example_config_documents_every_option_with_its_default():
    import dataclasses
    import re
    import tomllib
    from pathlib import Path

    from replicore import config as config_module

    text = (Path(__file__).parent.parent / "config" / "replicore.toml").read_text()
    uncommented = re.sub(r"(?m)^# (\w+ = .*)$", r"\1", text)
    parsed = config_module.parse(tomllib.loads(uncommented))
    assert parsed == config_module.Config(), "a documented default differs from config.py"
    blocks = dict(re.findall(r"(?ms)^\[(\w+)\]$(.*?)(?=^\[|\Z)", text))
    for section, cls in config_module._SECTIONS.items():
        assert section in blocks, f"section [{section}] is not in config/replicore.toml"
        documented = set(re.findall(r"(?m)^# (\w+) = ", blocks[section]))
        for field in dataclasses.fields(cls):
            assert field.name in documented, f"{section}.{field.name} is not documented"
    assert config_module.parse(tomllib.loads(text)) == config_module.Config()


def test_options_documented_as_restart_only_are_kept_by_a_reload():
    import re
    from pathlib import Path

    from replicore.daemon import RESTART_ONLY

    text = (Path(__file__).parent.parent / "config" / "replicore.toml").read_text()
    marked = set()
    for section, block in re.findall(r"(?ms)^\[(\w+)\]$(.*?)(?=^\[|\Z)", text):
        for comment, option in re.findall(r"(?ms)((?:^# (?!\w+ = ).*\n)+)^# (\w+) = ", block):
            if "(restart)" in comment:
                marked.add((section, option))
    assert marked, "no option is marked (restart)"
    missing = marked - set(RESTART_ONLY)
    assert not missing, (
        f"marked (restart) in config/replicore.toml but not in RESTART_ONLY: {missing}"
    )
