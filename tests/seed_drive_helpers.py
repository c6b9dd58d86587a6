"""Test helpers for seed drives and direct replication: running source-side commands in this
process (they take --dir, not --config), editing a drive file the way a forger would, and
reading the target's database."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

from replicore import seed_drive
from replicore.cli import main as cli_main
from replicore.source import identity


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        assert self.status == 0, self.stderr
        return json.loads(self.stdout)


def run(*args: str) -> Run:
    """`replicore ARGS` in this process (for the source-side commands)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli_main(list(args))
        except SystemExit as exit_:
            status = int(exit_.code or 0)
    return Run(status, out.getvalue(), err.getvalue())


def create_drive(
    source: identity.Identity,
    agent: str,
    volumes: dict[str, Path],
    output: Path,
    *extra: str,
) -> dict[str, Any]:
    """`replicore seed-drive create ... --json`; returns its result."""
    args = ["seed-drive", "create", "--dir", str(source.directory), "--agent", agent]
    for volume_id, path in volumes.items():
        args += ["--volume", f"{volume_id}={path}"]
    result = run(*args, "-o", str(output), "--json", *extra)
    assert result.status == 0, result.stderr
    data: dict[str, Any] = result.json
    return data


def query(server: Any, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on the server's database."""
    conn = apsw.Connection(str(server.database_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


@contextlib.contextmanager
def tampered(original: Path, copy: Path) -> Any:
    """A writable connection to a copy of the drive, to change it as a forger would."""
    shutil.copyfile(original, copy)
    conn = apsw.Connection(str(copy))
    try:
        yield conn
    finally:
        conn.close()


def read_manifest(conn: apsw.Connection) -> dict[str, Any]:
    data = conn.execute("SELECT value FROM drive WHERE name = 'manifest'").fetchone()[0]
    manifest: dict[str, Any] = json.loads(data)
    return manifest


def write_manifest(conn: apsw.Connection, manifest: dict[str, Any]) -> bytes:
    """Store `manifest` in its canonical form (the signature is left as it was)."""
    data = seed_drive.encode_manifest(seed_drive.decode_manifest(json.dumps(manifest).encode()))
    conn.execute("UPDATE drive SET value = ? WHERE name = 'manifest'", (data,))
    return data
