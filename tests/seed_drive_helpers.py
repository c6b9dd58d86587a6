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


# --------------------------------------------------------------------------
# Direct replication
# --------------------------------------------------------------------------


def bitmap_of(blocks: list[bytes]) -> bytes:
    """Used-block bitmap (LSB first) of `blocks`: set for each block that is not all zeros."""
    bits = bytearray(-(-len(blocks) // 8))
    for index, block in enumerate(blocks):
        if block.count(0) != len(block):
            bits[index >> 3] |= 1 << (index & 7)
    return bytes(bits)


class DirectClient:
    """Drives one agent's direct sessions through `client` (pinned, with the source's
    certificate), sending exactly what a test asks."""

    def __init__(self, client: Any, agent_id: str, job_id: str = "job-d") -> None:
        self.client, self.agent_id, self.job_id = client, agent_id, job_id

    def open(
        self,
        volume: str,
        epoch: int,
        size: int,
        block_size: int,
        previous: int | None = None,
        **overrides: Any,
    ) -> Any:
        body = {
            "agentId": self.agent_id,
            "jobId": self.job_id,
            "driverVolumeId": volume,
            "epochNumber": epoch,
            "previousEpochNumber": previous,
            "blockSize": block_size,
            "size": size,
            "recoveryPointId": f"rp-{volume}-{epoch}",
            "recoveryPointTimestamp": "2026-11-27T10:00:00Z",
            "volumeCount": 1,
            **overrides,
        }
        return self.client.post("slave/directreplicationsessions/new", json=body)

    def open_ok(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        response = self.open(*args, **kwargs)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def path(self, session_id: str, agent_id: str | None = None) -> str:
        return f"{agent_id or self.agent_id}/{self.job_id}/{session_id}"

    def file_body(self, volume: str, size: int, block_size: int, **open_info: Any) -> Any:
        return {
            "fullPath": f"/snapshots/{volume}.img",
            "openInfo": {
                "blockSize": block_size,
                "scid": "6c1c1c86-0000-4000-8000-000000000001",
                "size": size,
                "volumeId": volume,
                "imageType": "base",
                "partial": False,
                **open_info,
            },
        }

    def set_file(self, session_id: str, body: Any, agent_id: str | None = None) -> Any:
        return self.client.post(
            f"directreplication/slave/{self.path(session_id, agent_id)}", json=body
        )

    def bitmap(self, session_id: str, bits: bytes, agent_id: str | None = None) -> Any:
        return self.client.post(
            f"directreplication/slave/{self.path(session_id, agent_id)}/bitmap",
            content=bits,
            headers={"Content-Type": "application/octet-stream"},
        )

    def data(
        self,
        session_id: str,
        first: int,
        body: bytes,
        agent_id: str | None = None,
        codec: str | None = None,
    ) -> Any:
        headers = {"Content-Type": "application/octet-stream", "X-O3E-Block-Index": str(first)}
        if codec is not None:
            headers["X-O3E-Codec"] = codec
        return self.client.post(
            f"directreplication/slave/{self.path(session_id, agent_id)}/o3edata",
            content=body,
            headers=headers,
        )

    def file_info(self, session_id: str, agent_id: str | None = None) -> Any:
        return self.client.get(f"slave/agents/{self.path(session_id, agent_id)}/fileinfo")

    def description(self, session_id: str, agent_id: str | None = None) -> Any:
        return self.client.get(
            f"slave/agents/{self.path(session_id, agent_id)}/repoconnectiondescription"
        )
