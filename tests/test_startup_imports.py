"""What `replicore push` and `replicore export` import when they start: not the daemon's stack.

Each command runs as its own process, as `python -m replicore ...` (the way the benchmark runs
it), and lists the modules it holds when it exits. The start-up of `push` and `export` is part
of their time, and trio, httpx (with rich), cryptography and the web server each cost tens of
milliseconds to import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pairing_helpers import pair_by_demand
from push_helpers import export, make_image, push_args, sha256
from replicore.store import db, migrations

#: Top-level packages that neither command needs.
DAEMON_STACK = {
    "trio",
    "anyio",
    "httpx",
    "rich",
    "cryptography",
    "quart",
    "hypercorn",
    "msgspec",
    "prometheus_client",
}
#: push: besides the daemon's stack, nothing of the target's store or web side, and not
#: httpcore (which imports trio, anyio and h2 whenever they are installed): push drives h11.
PUSH_FORBIDDEN = DAEMON_STACK | {
    "h2",
    "httpcore",
    "apsw",
    "replicore.store",
    "replicore.api",
    "replicore.app",
}
#: export reads the database: nothing of the source side or the web side.
EXPORT_FORBIDDEN = DAEMON_STACK | {"httpcore", "replicore.source", "replicore.api", "replicore.app"}


#: `python -m replicore ARGS` that writes, on its way out, the modules it holds to a file.
RUN_AND_LIST = """
import atexit, json, os, runpy, sys
def dump():
    with open(os.environ["STARTUP_MODULES"], "w") as out:
        json.dump(sorted(n for n, m in sys.modules.items() if m is not None), out)
atexit.register(dump)
sys.argv = ["replicore", *sys.argv[1:]]
runpy.run_module("replicore", run_name="__main__", alter_sys=True)
"""


def run_command(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `replicore ARGS` as its own process, as `python -m replicore` does; returns the run
    and the modules it had imported when it ended."""
    listing = cwd / "modules.json"
    env = {k: v for k, v in os.environ.items() if k != "REPLICORE_SOURCE_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**env, "STARTUP_MODULES": str(listing)},
        timeout=120,
        check=False,
    )
    imported = set(json.loads(listing.read_text()))
    listing.unlink()
    return done, imported


def loaded(imported: set[str], forbidden: set[str]) -> list[str]:
    """The modules of `imported` that are, or are inside, one of `forbidden`."""
    return sorted(
        name for name in imported if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


def test_push_help_imports_none_of_the_daemon_stack(tmp_path: Path) -> None:
    done, imported = run_command("push", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "DRIVER_VOLUME_ID=PATH" in done.stdout
    assert "replicore.cli.push" in imported  # the real thing
    assert loaded(imported, PUSH_FORBIDDEN) == []


def test_export_help_imports_none_of_the_daemon_stack(tmp_path: Path) -> None:
    done, imported = run_command("export", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--recovery-point" in done.stdout
    assert "replicore.store.images" in imported
    assert loaded(imported, EXPORT_FORBIDDEN) == []


AGENT = "web01"


def test_a_push_process_imports_none_of_the_daemon_stack_and_completes(
    server, admin, make_source, tmp_path: Path
) -> None:
    source = make_source("startup")
    pair_by_demand(server, source, [AGENT], admin)
    image = tmp_path / "disk.img"
    data = make_image(image, 16, tail=100)
    done, imported = run_command(*push_args(source, server, AGENT, {"vol-c": image}), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert '"records_sent":' in done.stdout
    assert "h11" in imported and "replicore.source.push" in imported
    assert loaded(imported, PUSH_FORBIDDEN) == []
    assert sha256(export(server, AGENT, "vol-c", tmp_path / "out.img")) == sha256(data)


def test_a_push_process_without_an_identity_says_so_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_image(image, 1)
    args = ["push", "--dir", str(tmp_path / "nothing"), "--agent", "a", "--volume", f"v={image}"]
    done, imported = run_command(*args, cwd=tmp_path)
    assert done.returncode in (1, 2) and "replicore source init" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert loaded(imported, PUSH_FORBIDDEN) == []


def export_args(config: Path) -> list[str]:
    """`export` of an agent that does not exist, against the daemon of `config`."""
    return ["export", "--config", str(config), "--agent", "a", "--volume", "v", "-o", "out.img"]


def make_database(tmp_path: Path) -> Path:
    """A config whose state directory holds an empty, current database; returns the config."""
    state = tmp_path / "state"
    state.mkdir()
    conn = db.connect(state / "replicore.db", create=True)
    try:
        migrations.apply(conn, state / "replicore.db")
    finally:
        conn.close()
    config = tmp_path / "replicore.toml"
    config.write_text(f'[server]\nstate_dir = "{state}"\n')
    return config


def test_an_export_process_imports_none_of_the_daemon_stack(tmp_path: Path) -> None:
    config = make_database(tmp_path)
    done, imported = run_command(*export_args(config), cwd=tmp_path)
    assert done.returncode == 2 and "no agent 'a'" in done.stderr, done.stderr
    assert "replicore.store.db" in imported and "replicore.store.migrations" in imported
    assert loaded(imported, EXPORT_FORBIDDEN) == []
    # opening the database checks its version against LATEST, without the steps' modules
    assert "replicore.store.sessions" not in imported
    assert "replicore.store.seed_drives" not in imported


def test_latest_schema_version_is_the_number_of_the_last_step() -> None:
    numbers = [number for number, _description, _scripts in migrations.STEPS]
    assert numbers == list(range(1, len(numbers) + 1))
    assert numbers[-1] == migrations.LATEST


def test_errors_of_modules_imported_on_demand_are_still_one_line(tmp_path: Path) -> None:
    config = tmp_path / "replicore.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "empty"}"\n')
    done, _ = run_command(*export_args(config), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("replicore: no database at")
    config.write_text("[server]\nlisten = 8006\n")
    done, _ = run_command(*export_args(config), cwd=tmp_path)
    assert done.returncode == 2 and "server.listen" in done.stderr
    assert "Traceback" not in done.stderr
