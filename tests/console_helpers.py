"""Test helpers for the web console: an httpx client that logs in the way a browser does
(login form token, session cookie, CSRF token read from the page), a headless Chromium
driven by Selenium (Debian's chromium and chromedriver, nothing downloaded), and a replication
job driven through the API as a source's job would be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from html import unescape
from pathlib import Path
from typing import Any

import apsw
import httpx

from datapath_helpers import DataPathClient
from pairing_helpers import pairing_body, save_target
from replicore.source import connection

CONSOLE_PATH = "/apprecovery/admin"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Size of the screenshots and of the browser's viewport.
VIEWPORT = (1366, 768)

#: Block size of the images the tests push.
BLOCK = 64 * 1024

_NOTICE = re.compile(r'<div class="notice notice-\w+" role="status">(.*?)</div>', re.S)
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')


def console_client(server: Any, **kwargs: Any) -> httpx.Client:
    """An httpx client pinned to the server, at the server's root (not the API's)."""
    return httpx.Client(
        base_url=server.url.rstrip("/"),
        verify=connection.ssl_context(server.pem, None),
        timeout=30.0,
        **kwargs,
    )


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def login_token_of(html: str) -> str:
    found = _LOGIN_TOKEN.search(html)
    assert found, "the login page has no login token"
    return found.group(1)


def login_form(client: httpx.Client, user: str, password: str) -> httpx.Response:
    """Fetch the login form (its token cookie) and post the credentials."""
    page = client.get(f"{CONSOLE_PATH}/login")
    assert page.status_code == 200, page.text
    return client.post(
        f"{CONSOLE_PATH}/login",
        data={"login_token": login_token_of(page.text), "user": user, "password": password},
    )


@contextlib.contextmanager
def logged_in(server: Any, admin: tuple[str, str]) -> Iterator[httpx.Client]:
    """A client with a console session of `admin` (closed afterwards)."""
    with console_client(server) as client:
        answer = login_form(client, *admin)
        assert answer.status_code == 303, answer.text
        yield client


def csrf(client: httpx.Client) -> str:
    """The session's CSRF token, read from the dashboard."""
    page = client.get(f"{CONSOLE_PATH}/")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)


def post(client: httpx.Client, path: str, **data: str) -> httpx.Response:
    """POST a console form with the session's CSRF token."""
    return client.post(f"{CONSOLE_PATH}{path}", data={"csrf": csrf(client), **data})


def audit_rows(server: Any, action: str) -> list[dict[str, Any]]:
    """The audit log's rows of `action` (`replicore audit --action ACTION --json`)."""
    result = server.cli("audit", "--action", action, "--json")
    assert result.status == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def notices(html: str) -> list[str]:
    """The texts of the one-shot notices on a page."""
    return [unescape(n) for n in _NOTICE.findall(html)]


@contextlib.contextmanager
def module_server(root: Path, admin: tuple[str, str], extra_toml: str = "") -> Iterator[Any]:
    """A real server (as conftest's `make_server`) with the administrator `admin`, for a
    module-scoped fixture (tests that share it use sources of their own)."""
    from conftest import RunningServer, write_config

    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "replicore.toml"
    write_config(config_path, root / "state", extra_toml)
    server = RunningServer(config_path, root / "state", root / "server.log").start()
    try:
        added = server.cli("admin", "add", admin[0], "--password-stdin", stdin=admin[1] + "\n")
        assert added.status == 0, added.stderr
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


def push_image(
    server: Any,
    source: Any,
    agent_id: str,
    volume: str,
    epoch: int,
    image: bytes,
    *,
    previous: int | None = None,
    timestamp: str = "2026-11-27T10:00:00Z",
    block_size: int = BLOCK,
) -> dict[str, Any]:
    """Push `image` as volume:epoch of the source's agent and commit it (data path API)."""
    with server.client(source) as client:
        pushed = DataPathClient(client, agent_id, f"job-{volume}-{epoch}").push(
            volume,
            epoch,
            image,
            block_size,
            previous,
            recovery_point=f"rp-{agent_id}-{volume}-{epoch}",
            timestamp=timestamp,
        )
    return pushed.commit


def named_source(make_source: Any, name: str, host_name: str) -> Any:
    """A new source identity that calls itself `host_name` (identities take the machine's
    host name; the pages show the source's)."""
    return dataclasses.replace(make_source(name), host_name=host_name)


def pair_customer(
    server: Any,
    source: Any,
    agents: list[str],
    admin: tuple[str, str],
    customer_id: str,
    email: str,
) -> dict[str, Any]:
    """Pair `source` by demand with a customer id and e-mail (its own new repository)."""
    body = pairing_body(source, agents, customer_id=customer_id, email=email)
    with server.client() as client:
        answer = client.post("slave/pairing/demand", json=body, auth=admin)
    assert answer.status_code == 200, answer.text
    paired: dict[str, Any] = answer.json()
    save_target(server, source, paired)
    return paired


def iso_ago(seconds: float) -> str:
    """An ISO 8601 UTC timestamp `seconds` before now (for recovery points)."""
    return datetime.fromtimestamp(time.time() - seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def seed_usage_history(server: Any, days: int = 30) -> None:
    """Write a made-up history of daily usage samples, growing to each source's latest real
    sample, into the server's database (for a screenshot of the billing chart only: a test
    run lasts a minute, the chart shows weeks)."""
    conn = apsw.Connection(str(server.database_path))
    conn.set_busy_timeout(15_000)
    try:
        latest = list(
            conn.execute(
                "SELECT core_pk, customer_id, stored_bytes, max(at) FROM usage_samples"
                " GROUP BY core_pk"
            )
        )
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        for index, (core_pk, customer_id, stored, _) in enumerate(latest):
            for day in range(days, 0, -1):
                growth = 0.35 + 0.65 * (days - day) / days
                wobble = 1 + 0.04 * math.sin(day * (index + 1.3))
                conn.execute(
                    "INSERT OR IGNORE INTO usage_samples(core_pk, at, customer_id, stored_bytes)"
                    " VALUES (?, ?, ?, ?)",
                    (core_pk, now - day * 86400.0, customer_id, int(stored * growth * wobble)),
                )
        conn.execute("COMMIT")
    finally:
        conn.close()


# --------------------------------------------------------------------------
# A replication job as a source runs it (the push command does not mirror jobs)
# --------------------------------------------------------------------------


def start_job(client: httpx.Client, job_id: str, agent_id: str, images: list[str]) -> None:
    started = client.post(
        "slave/agents/replicationJob/start",
        json={"id": job_id, "agents": [{"id": agent_id, "volumeImagesToTransfer": images}]},
    )
    assert started.status_code == 201, started.text


def sync_job(client: httpx.Client, job_id: str, **progress: Any) -> None:
    synced = client.post("slave/agents/replicationJob/sync", json={"id": job_id, **progress})
    assert synced.status_code == 200, synced.text


# --------------------------------------------------------------------------
# Headless Chromium
# --------------------------------------------------------------------------


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        return f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -e .[test])"
    return None


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (root-safe flags, a fresh profile, self-signed TLS accepted) with
    a 1366x768 viewport; quit and its profile removed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="replicore-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--ignore-certificate-errors",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False},
        )
        driver.implicitly_wait(0)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot_dir() -> Path | None:
    """Where to save screenshots ($REPLICORE_SCREENSHOTS), or None."""
    target = os.environ.get("REPLICORE_SCREENSHOTS")
    if not target:
        return None
    path = Path(target)
    path.mkdir(parents=True, exist_ok=True)
    return path
