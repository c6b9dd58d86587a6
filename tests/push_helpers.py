"""Test helpers for the push client: small deterministic disk-like images, their mutation, and
running `replicore push` (in this process, or as a subprocess that can be killed) and
`replicore export` against a test server."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replicore.cli import main as cli_main
from replicore.source import identity

BLOCK = 64 * 1024
_WORDS = [
    "error",
    "warning",
    "info",
    "request",
    "response",
    "session",
    "volume",
    "block",
    "snapshot",
    "agent",
    "epoch",
    "commit",
    "index",
    "record",
    "key",
    "value",
    "offset",
    "length",
    "status",
    "ok",
    "failed",
    "retry",
    "timeout",
]


def _text_block(rng: random.Random, size: int) -> bytes:
    parts: list[str] = []
    total = 0
    while total < size:
        line = f"{rng.getrandbits(40):x} {' '.join(rng.choices(_WORDS, k=12))}\n"
        parts.append(line)
        total += len(line)
    return "".join(parts).encode()[:size]


def make_image(path: Path, blocks: int, seed: int = 1, *, tail: int = 0) -> bytes:
    """A disk-like image of `blocks` 64 KiB blocks (about 30% zero, 30% text, 40% random),
    plus `tail` bytes of a short last block; returns its bytes."""
    rng = random.Random(f"push-image:{seed}")
    out = bytearray()
    for _ in range(blocks):
        kind = rng.random()
        if kind < 0.3:
            out += bytes(BLOCK)
        elif kind < 0.6:
            out += _text_block(rng, BLOCK)
        else:
            out += rng.randbytes(BLOCK)
    out += rng.randbytes(tail)
    path.write_bytes(out)
    return bytes(out)


def random_image(path: Path, size: int, seed: int = 1) -> bytes:
    """Incompressible, all blocks distinct."""
    data = random.Random(f"push-random:{seed}").randbytes(size)
    path.write_bytes(data)
    return data


def mutate(path: Path, count: int, seed: int = 2) -> list[int]:
    """Rewrite `count` distinct 64 KiB blocks with fresh random bytes; returns their indices."""
    rng = random.Random(f"push-mutate:{seed}")
    blocks = path.stat().st_size // BLOCK
    chosen = sorted(rng.sample(range(blocks), count))
    with path.open("r+b") as f:
        for index in chosen:
            f.seek(index * BLOCK)
            f.write(rng.randbytes(BLOCK))
    return chosen


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class PushRun:
    status: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        assert self.status == 0, self.stderr
        lines = self.stdout.strip().splitlines()
        assert len(lines) == 1, self.stdout
        return json.loads(lines[0])


def push_args(
    source: identity.Identity, server: Any, agent: str, volumes: dict[str, Path], *extra: str
) -> list[str]:
    args = ["push", "--dir", str(source.directory), "--target", server.url, "--agent", agent]
    for volume_id, path in volumes.items():
        args += ["--volume", f"{volume_id}={path}"]
    return [*args, "--json", *extra]


def push(
    source: identity.Identity, server: Any, agent: str, volumes: dict[str, Path], *extra: str
) -> PushRun:
    """Run `replicore push ... --json` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli_main(push_args(source, server, agent, volumes, *extra))
        except SystemExit as exit_:
            status = int(exit_.code or 0)
    return PushRun(status, out.getvalue(), err.getvalue())


def push_process(
    source: identity.Identity, server: Any, agent: str, volumes: dict[str, Path], *extra: str
) -> subprocess.Popen[bytes]:
    """Start `python -m replicore push ... --json` as a subprocess."""
    return subprocess.Popen(
        [sys.executable, "-m", "replicore", *push_args(source, server, agent, volumes, *extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "REPLICORE_SOURCE_DIR"},
    )


def export(server: Any, agent: str, volume: str, output: Path, *extra: str) -> bytes:
    """`replicore export` on the server's database; returns the exported bytes."""
    result = server.cli("export", "--agent", agent, "--volume", volume, "-o", str(output), *extra)
    assert result.status == 0, result.stderr
    return output.read_bytes()
