"""The built one-file executable, end to end: serve, administer, pair a source by demand,
push an image, export it back, reload, stop; nothing left in its extraction directory.

Uses dist/replicore when it is newer than the sources (CI builds it first with
packaging/build.sh), else builds it here (about a minute). REPLICORE_SKIP_BINARY=1 skips.
Where the kernel allows, the daemon runs as systemd would run it: no capabilities
(CapabilityBoundingSet=), no_new_privs (NoNewPrivileges=) and memory that is never both
writable and executable (MemoryDenyWriteExecute=, through prctl PR_SET_MDWE), with its own
empty TMPDIR (PrivateTmp=).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ops_helpers import NotifySocket, value
from replicore.source import connection

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "dist" / "replicore"

pytestmark = pytest.mark.skipif(
    os.environ.get("REPLICORE_SKIP_BINARY") == "1", reason="REPLICORE_SKIP_BINARY=1"
)

#: Run a command with PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN): what MemoryDenyWriteExecute= does.
MDWE = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(97)
os.execvp(sys.argv[1], sys.argv[1:])
"""


def _sources_newer_than(path: Path) -> bool:
    built = path.stat().st_mtime
    inputs = [ROOT / "pyproject.toml", ROOT / "packaging" / "replicore.spec"]
    inputs += [  # code and data files (the console's templates and stylesheet)
        p for p in (ROOT / "daemon" / "replicore").rglob("*") if "__pycache__" not in p.parts
    ]
    return any(p.stat().st_mtime > built for p in inputs)


@pytest.fixture(scope="module")
def binary() -> Path:
    if not BINARY.exists() or _sources_newer_than(BINARY):
        build = subprocess.run(
            ["bash", str(ROOT / "packaging" / "build.sh")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return BINARY


def _sandbox_prefix() -> list[str]:
    """The systemd-like restrictions this machine can apply to a process."""
    prefix: list[str] = []
    if subprocess.run([sys.executable, "-c", MDWE, "true"]).returncode == 0:
        prefix = [sys.executable, "-c", MDWE]
    setpriv = shutil.which("setpriv")
    if setpriv and os.geteuid() == 0:
        prefix += [setpriv, "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]
    return prefix


def test_the_binary_serves_pairs_pushes_exports_reloads_and_stops_cleanly(binary, tmp_path):
    extract = tmp_path / "tmp"  # the executable's TMPDIR: must be empty at the end
    extract.mkdir()
    state = tmp_path / "state"
    config = tmp_path / "replicore.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nstate_dir = "{state}"\nshutdown_timeout = 5.0\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    env = {**os.environ, "TMPDIR": str(extract)}
    env.pop("REPLICORE_CONFIG", None)

    def run(*args: str, stdin: str = "", config_option: bool = True) -> str:
        command = [str(binary), *args, *(["--config", str(config)] if config_option else [])]
        done = subprocess.run(
            command, input=stdin, capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
        return done.stdout

    assert "replicore" in run("--version", config_option=False)
    assert "config OK" in run("check-config")

    notify = NotifySocket(tmp_path / "notify.sock")
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(
            [*_sandbox_prefix(), str(binary), "serve", "--config", str(config)],
            stdout=log,
            stderr=log,
            env={**env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"},
        )
    try:
        sender = notify.sender("READY")
        # One-file mode: the Python child notifies, not the main pid (hence NotifyAccess=all).
        assert sender not in (0, daemon.pid)
        notify.wait_for("WATCHDOG")
        info = json.loads((state / "daemon.json").read_text())
        url = info["urls"][0]
        assert info["pid"] == sender
        assert run("fingerprint").strip() == info["fingerprint"]

        run("admin", "add", "root-admin", "--password-stdin", stdin="binary-test-pw\n")
        source_dir = str(tmp_path / "source")
        run("source", "init", "--dir", source_dir, config_option=False)
        run(
            "source", "pair", "--target", url, "--fingerprint", info["fingerprint"],
            "--agent", "web01", "--demand", "--user", "root-admin", "--password-stdin",
            "--dir", source_dir, stdin="binary-test-pw\n", config_option=False,
        )  # fmt: skip

        image = tmp_path / "disk.img"
        block = os.urandom(64 * 1024)
        image.write_bytes(block * 3 + os.urandom(64 * 1024 * 5) + bytes(64 * 1024 * 4))
        pushed = run(
            "push", "--target", url, "--agent", "web01", "--volume", f"vol1={image}",
            "--dir", source_dir, "--json", config_option=False,
        )  # fmt: skip
        assert json.loads(pushed.strip().splitlines()[-1])["records_sent"] > 0
        exported = tmp_path / "exported.img"
        run("export", "--agent", "web01", "--volume", "vol1", "-o", str(exported))
        assert (
            hashlib.sha256(exported.read_bytes()).digest()
            == hashlib.sha256(image.read_bytes()).digest()
        )

        status = json.loads(run("status", "--json"))
        assert status["daemon"]["pid"] == sender and status["daemon"]["listen"] == [url]
        assert len(status["database"]["paired_sources"]) == 1
        scraped = httpx.get(info["metrics"][0], timeout=10).text
        assert value(scraped, "replicore_sessions_committed_total") is not None
        # The console is served from the executable: its template and its stylesheet.
        pem = connection.pin(url, info["fingerprint"])
        with httpx.Client(base_url=url, verify=connection.ssl_context(pem, None)) as web:
            login = web.get("/apprecovery/admin/login")
            assert login.status_code == 200 and 'name="login_token"' in login.text
            css = web.get("/apprecovery/admin/static/console.css")
            assert css.status_code == 200 and ".login-card" in css.text
        run("backup-db", "-o", str(tmp_path / "copy.db"))

        daemon.send_signal(signal.SIGHUP)  # to the bootloader, which forwards it
        notify.wait_for("RELOADING")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
            raise
    log_text = log_path.read_text()
    assert code == 0, log_text[-3000:]
    notify.wait_for("STOPPING")
    notify.close()
    lines = [json.loads(line) for line in log_text.splitlines()]
    assert any(line["msg"].startswith("reloaded the config") for line in lines)
    assert lines[-1]["msg"] == "stopped"
    assert list(extract.iterdir()) == []  # no _MEI folder left behind


def test_install_sh_stages_binary_unit_and_config_without_overwriting_it(binary, tmp_path):
    stage = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(stage), "BINARY": str(binary), "TMPDIR": str(tmp_path)}
    script = str(ROOT / "packaging" / "install.sh")
    first = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "config OK" in first.stdout
    installed = stage / "usr" / "local" / "bin" / "replicore"
    assert installed.read_bytes() == binary.read_bytes() and os.access(installed, os.X_OK)
    unit = stage / "etc" / "systemd" / "system" / "replicore.service"
    assert unit.read_text() == (ROOT / "systemd" / "replicore.service").read_text()
    config = stage / "etc" / "replicore" / "replicore.toml"
    assert stat_mode(config) == 0o640
    assert 'state_dir = "/var/lib/replicore"' in config.read_text().splitlines()

    config.write_text(config.read_text() + "\n# edited by the operator\n")
    again = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept the existing" in again.stdout
    assert config.read_text().endswith("# edited by the operator\n")


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
