"""Shared fixtures: a real `replicore serve` process on a free loopback port with real TLS and
a real SQLite file in a temp dir, source identities with real client certificates, and clients
pinned to the server's certificate."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from replicore.app import create_app
from replicore.cli import main as cli_main
from replicore.config import parse
from replicore.daemon import prepare_state
from replicore.runtime import Runtime
from replicore.server import TrustStore
from replicore.source import connection, identity
from replicore.store import db, migrations

START_TIMEOUT = 30.0


@dataclass
class CliResult:
    status: int
    stdout: str
    stderr: str


@dataclass
class RunningServer:
    config_path: Path
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    fingerprint: str = ""
    core_id: str = ""
    pem: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self) -> RunningServer:
        info = self.state_dir / "daemon.json"
        info.unlink(missing_ok=True)
        env = {**os.environ, **self.extra_env}
        env.pop("REPLICORE_CONFIG", None)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "replicore", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env=env,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not info.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server did not start: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        data = json.loads(info.read_text())
        self.url, self.fingerprint, self.core_id = (
            data["urls"][0],
            data["fingerprint"],
            data["coreId"],
        )
        self.pem = connection.pin(self.url, self.fingerprint)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> RunningServer:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        return self.start()

    def cli(self, *args: str, stdin: str = "") -> CliResult:
        """Run a replicore command in-process against this server's config."""
        out, err = io.StringIO(), io.StringIO()
        old_stdin = sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status = cli_main([*args, "--config", str(self.config_path)])
                except SystemExit as exit_:
                    status = int(exit_.code or 0)
        finally:
            sys.stdin = old_stdin
        return CliResult(status, out.getvalue(), err.getvalue())

    def client(self, source: identity.Identity | None = None, **kwargs: Any) -> httpx.Client:
        """A client pinned to this server; with `source`, presenting its certificate."""
        return connection.client(self.url, self.pem, source, **kwargs)

    @property
    def database_path(self) -> Path:
        return self.state_dir / "replicore.db"


def write_config(path: Path, state_dir: Path, extra: str = "") -> None:
    if "[metrics]" not in extra:  # every test server its own free metrics port
        extra += '\n[metrics]\nlisten = "127.0.0.1:0"\n'
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nstate_dir = "{state_dir}"\n'
        f"shutdown_timeout = 5.0\n{extra}"
    )


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Any]:
    """Factory: make_server(extra_toml="") -> a started RunningServer; all are stopped after."""
    servers: list[RunningServer] = []

    def factory(extra_toml: str = "", name: str = "server", start: bool = True) -> RunningServer:
        root = tmp_path / name
        root.mkdir()
        config_path = root / "replicore.toml"
        write_config(config_path, root / "state", extra_toml)
        server = RunningServer(config_path, root / "state", root / "server.log")
        servers.append(server)
        return server.start() if start else server

    yield factory
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture
def server(make_server: Any) -> RunningServer:
    return make_server()


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[Any]:
    """A connection to a new database with the current schema (for store-level tests)."""
    path = tmp_path / "replicore.db"
    connection = db.connect(path, create=True)
    migrations.apply(connection, path)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The application in-process (no server, a database of its own), for its routes."""
    state = tmp_path_factory.mktemp("app")
    config = parse({"server": {"state_dir": str(state), "listen": "127.0.0.1:0"}})
    core_id, cert, key = prepare_state(config)
    database = db.Database(config.database_path, readers=1)
    runtime = Runtime(
        config=config, db=database, trust=TrustStore(cert, key), core_id=core_id,
        server_fingerprint="",
    )  # fmt: skip
    yield create_app(runtime)
    database.close()


@pytest.fixture
def make_source(tmp_path: Path) -> Any:
    """Factory: make_source(name) -> a fresh source identity (key, certificate, core id)."""

    def factory(name: str = "source") -> identity.Identity:
        return identity.init(tmp_path / f"source-{name}")

    return factory


ADMIN_USER, ADMIN_PASSWORD = "admin", "correct horse battery"


@pytest.fixture
def admin(server: RunningServer) -> tuple[str, str]:
    """An administrator account on `server`."""
    result = server.cli("admin", "add", ADMIN_USER, "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    assert result.status == 0, result.stderr
    return ADMIN_USER, ADMIN_PASSWORD
