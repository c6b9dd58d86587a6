"""The source's identity on disk: its key and self-signed client certificate, and the targets it
has paired with (their URL, pinned server certificate and core id).

Layout of the directory (default `~/.config/replicore-source`, or `$REPLICORE_SOURCE_DIR`):
`client.crt`, `client.key` (0600), `source.json` (this source's core id and host name) and
`targets/<core id>.json` per paired target, with the target's certificate PEM.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import certs

ENV_VAR = "REPLICORE_SOURCE_DIR"


class IdentityError(RuntimeError):
    """No identity where one is needed, or an unusable one."""


def default_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "replicore-source"


@dataclass(frozen=True)
class Identity:
    directory: Path
    core_id: str
    host_name: str

    @property
    def cert_path(self) -> Path:
        return self.directory / "client.crt"

    @property
    def key_path(self) -> Path:
        return self.directory / "client.key"

    @property
    def certificate_pem(self) -> str:
        return self.cert_path.read_text(encoding="ascii")

    @property
    def fingerprint(self) -> str:
        return certs.pem_fingerprint(self.certificate_pem)

    def target_path(self, target_core_id: str) -> Path:
        return self.directory / "targets" / f"{target_core_id}.json"

    def save_target(self, record: dict[str, Any]) -> None:
        path = self.target_path(record["coreId"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)

    def targets(self) -> list[dict[str, Any]]:
        folder = self.directory / "targets"
        if not folder.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]

    def find_target(self, url: str | None) -> dict[str, Any]:
        """The paired target with this URL, or the only one when url is None."""
        found = self.targets()
        if url is not None:
            wanted = url.rstrip("/")
            found = [t for t in found if t["url"].rstrip("/") == wanted]
        if not found:
            raise IdentityError(
                f"not paired with {url}; run `replicore source pair` first"
                if url
                else "not paired with any target; run `replicore source pair` first"
            )
        if len(found) > 1:
            raise IdentityError("paired with several targets; name one with --target URL")
        return found[0]


def init(directory: Path | None = None, *, force: bool = False) -> Identity:
    """Make a key, a self-signed client certificate and a core id (kept if present)."""
    directory = directory or default_dir()
    if (directory / "source.json").exists() and not force:
        return load(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    core_id = str(uuid.uuid4())
    host = socket.gethostname()
    cert_pem, key_pem = certs.make_self_signed(f"replicore source {core_id}", server=False)
    certs.write_pair(directory / "client.crt", directory / "client.key", cert_pem, key_pem)
    (directory / "source.json").write_text(json.dumps({"coreId": core_id, "hostName": host}))
    return Identity(directory, core_id, host)


def load(directory: Path | None = None) -> Identity:
    directory = directory or default_dir()
    try:
        info = json.loads((directory / "source.json").read_text())
    except FileNotFoundError:
        raise IdentityError(
            f"no source identity in {directory}; run `replicore source init` first"
        ) from None
    return Identity(directory, info["coreId"], info["hostName"])
