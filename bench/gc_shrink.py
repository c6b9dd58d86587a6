#!/usr/bin/env python3
"""Space that really comes back, at full size: a source deletes an agent, the operator purges
it from the recycle bin, garbage collection runs, and the database file on disk (main file
plus WAL, after gc's truncating checkpoint) must shrink by at least 90% of the agent's
unique data, while a second agent sharing records with it still exports exactly.

The CI test (tests/test_bin.py) does the same with the test client at a smaller size; this
script runs the real commands end to end: `replicore serve` over TLS on 127.0.0.1,
`replicore source pair --demand`, `replicore push` of incompressible image files (so stored
bytes equal unique bytes), the source's `DELETE slave/agents/web01`, `replicore bin purge`
(which collects garbage), `replicore export` of the other agent, compared by SHA-256.

    python bench/gc_shrink.py                  # 1024 MiB of unique data
    python bench/gc_shrink.py --size-mib 256   # the issue's CI figure

Prints one JSON line with the sizes and times; exit status 1 if the file did not shrink
enough or the export differs. Temp data is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import daemon
from procfs import log

MIB = 1024 * 1024
PASSWORD = "gc-shrink-password-0123"
SESSION_TIMEOUT = 5.0
COMMAND_TIMEOUT = 1800


def write_random(path: Path, seed: int, size: int) -> None:
    """Incompressible, reproducible bytes."""
    with path.open("wb") as out:
        for counter in range(-(-size // MIB)):
            chunk = hashlib.shake_256(f"{seed}:{counter}".encode()).digest(MIB)
            out.write(chunk[: min(MIB, size - counter * MIB)])


def concat(target: Path, *parts: Path) -> None:
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 8 * MIB)


def disk_bytes(database: Path) -> int:
    return sum(
        os.path.getsize(f"{database}{s}") for s in ("", "-wal") if os.path.exists(f"{database}{s}")
    )


class Run:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.config = work / "replicore.toml"
        self.state = work / "state"
        self.source = work / "source"
        self.server: subprocess.Popen[bytes] | None = None
        self.url = ""

    def replicore(self, *args: str, stdin: str = "", config: bool = True) -> str:
        command = [sys.executable, "-m", "replicore", *args]
        if config:
            command += ["--config", str(self.config)]
        done = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
        if done.returncode != 0:
            raise RuntimeError(f"replicore {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def start(self) -> None:
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\nstate_dir = "{self.state}"\n'
            f"[replication]\nsession_timeout = {SESSION_TIMEOUT}\n"
            '[log]\nformat = "text"\n[metrics]\nlisten = ""\n'
        )
        self.server, self.url, fingerprint = daemon.start(
            [sys.executable, "-m", "replicore", "serve", "--config", str(self.config)],
            self.state,
            self.work / "server.log",
        )
        self.replicore("admin", "add", "admin", "--password-stdin", stdin=PASSWORD + "\n")
        self.replicore("source", "init", "--dir", str(self.source), config=False)
        self.replicore(
            "source", "pair", "--target", self.url, "--fingerprint", fingerprint,
            "--agent", "web01", "--agent", "db01", "--demand", "--user", "admin",
            "--password-stdin", "--dir", str(self.source), stdin=PASSWORD + "\n", config=False,
        )  # fmt: skip

    def push(self, agent: str, image: Path) -> None:
        self.replicore(
            "push", "--target", self.url, "--agent", agent, "--volume", f"c={image}",
            "--dir", str(self.source), "--json", config=False,
        )  # fmt: skip

    def delete_agent(self, agent: str) -> None:
        from replicore.source import connection, identity

        source = identity.load(self.source)
        target = source.targets()[0]
        with connection.client(self.url, target["certificate"], source) as client:
            response = client.delete(f"slave/agents/{agent}")
        if response.status_code != 200:
            raise RuntimeError(f"DELETE slave/agents/{agent}: {response.text}")

    def stop(self) -> None:
        daemon.stop(self.server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="unique data of the agent")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="replicore-gc."))
    run = Run(work)
    result: dict[str, Any] = {"unique_mib": args.size_mib}
    try:
        log(f"work dir {work}")
        shared, unique, own = work / "shared.bin", work / "unique.bin", work / "own.bin"
        write_random(shared, 1, 16 * MIB)
        write_random(unique, 2, args.size_mib * MIB)
        write_random(own, 3, 4 * MIB)
        web, dbs = work / "web.img", work / "db.img"
        concat(web, shared, unique)
        concat(dbs, shared, own)
        for path in (shared, unique, own):
            path.unlink()
        run.start()
        started = time.monotonic()
        run.push("web01", web)
        run.push("db01", dbs)
        result["push_seconds"] = round(time.monotonic() - started, 2)
        web.unlink()
        pushed_at = time.monotonic()
        run.delete_agent("web01")
        time.sleep(max(0.0, SESSION_TIMEOUT + 1 - (time.monotonic() - pushed_at)))
        run.replicore("gc")  # truncating checkpoint: the baseline
        database = run.state / "replicore.db"
        before = disk_bytes(database)
        started = time.monotonic()
        purged = run.replicore("bin", "purge", "--all")
        result["purge_gc_seconds"] = round(time.monotonic() - started, 2)
        after = disk_bytes(database)
        log(purged.strip())
        exported = work / "db-export.img"
        run.replicore("export", "--agent", "db01", "--volume", "c", "-o", str(exported))
        result.update(
            bytes_before=before,
            bytes_after=after,
            shrunk_bytes=before - after,
            shrunk_fraction_of_unique=round((before - after) / (args.size_mib * MIB), 4),
            shared_agent_exports_exactly=daemon.sha256_file(exported) == daemon.sha256_file(dbs),
        )
    finally:
        run.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    ok = result.get("shrunk_fraction_of_unique", 0) >= 0.9 and result.get(
        "shared_agent_exports_exactly"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
