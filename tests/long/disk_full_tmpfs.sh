#!/usr/bin/env bash
# A real full file system: the daemon's state directory (database, WAL, TLS material) on a
# small tmpfs mounted inside a private mount namespace (`unshare -m`), nothing else on it.
#
#   tests/long/disk_full_tmpfs.sh [TMPFS_MIB]      (default 96; needs root or user namespaces)
#
# 1. Refused up front: with a ballast file leaving less room than the image needs, the push
#    gets 507 at key negotiation (the target reserves the records' size against the free
#    disk) and nothing is stored.
# 2. ENOSPC during the transfer (WAL growth): the push starts with room for it, then another
#    process fills the file system while records arrive; SQLite's writes to the WAL (and the
#    checkpoints into the main file) fail with ENOSPC -> SQLITE_FULL, and the daemon must
#    answer 507 (never 500), keep serving, and keep the database sound.
# 3. Space freed (the filler and ballast deleted): the same push resumes its session, sends
#    only what is missing, commits, and the export is exact. Then a SIGKILL and restart, and
#    the database is still sound (`integrity_check`, `replicore verify`).
# Prints what SQLite and the daemon did at each step; exit status 0 when all held.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tests="$(dirname "$here")"
size_mib="${1:-96}"

if [ -z "${REPLICORE_TMPFS_NS:-}" ]; then
    if [ "$(id -u)" = 0 ]; then
        exec unshare -m --propagation private env REPLICORE_TMPFS_NS=1 "$0" "$@"
    fi
    exec unshare -r -m --propagation private env REPLICORE_TMPFS_NS=1 "$0" "$@"
fi

work="$(mktemp -d /tmp/replicore-tmpfs.XXXXXX)"
mkdir -p "$work/fs"
mount -t tmpfs -o "size=${size_mib}m" tmpfs "$work/fs"
trap 'umount "$work/fs" 2>/dev/null || true; rm -rf "$work"' EXIT
echo "tmpfs of ${size_mib} MiB at $work/fs (private mount namespace)"

PYTHON="${PYTHON:-python3}"
[ -x /work/venv/bin/python ] && [ "$PYTHON" = python3 ] && PYTHON=/work/venv/bin/python

"$PYTHON" - "$tests" "$work" <<'EOF'
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

tests, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(tests))

from conftest import RunningServer, write_config  # noqa: E402
from faults_helpers import follow, integrity, query, verify  # noqa: E402
from pairing_helpers import pair_by_demand  # noqa: E402
from push_helpers import push, push_args, random_image, sha256  # noqa: E402
from replicore.source import identity  # noqa: E402

MIB = 1024 * 1024
ADMIN = ("admin", "correct horse battery")
fs = work / "fs"
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("  ok    " if ok else "  FAIL  ") + what)
    if not ok:
        failures.append(what)


def free() -> int:
    return shutil.disk_usage(fs).free


def fill(path: Path, leave: int) -> int:
    """Write zeros to `path` until only `leave` bytes are free (or ENOSPC); bytes written."""
    written = 0
    chunk = b"\0" * MIB
    with path.open("ab") as f:
        while free() - len(chunk) > leave:
            try:
                f.write(chunk)
                f.flush()
            except OSError:
                break
            written += len(chunk)
    return written


def files() -> str:
    state = fs / "state"
    sizes = {p.name: p.stat().st_size for p in state.glob("replicore.db*")}
    return ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in sorted(sizes.items()))


config = work / "replicore.toml"
write_config(config, fs / "state", "")
server = RunningServer(config, fs / "state", work / "server.log").start()
try:
    assert server.cli("admin", "add", ADMIN[0], "--password-stdin", stdin=ADMIN[1]).status == 0
    source = identity.init(work / "source")
    pair_by_demand(server, source, ["web01"], ADMIN)
    image = work / "disk.img"
    image_mib = 40
    data = random_image(image, image_mib * MIB, seed=7)  # incompressible: stored as sent
    print(f"empty database: {files()}; {free() / MIB:.1f} MiB free")

    print(f"1. {image_mib} MiB push with 20 MiB free")
    ballast = fs / "ballast"
    fill(ballast, 20 * MIB)
    run = push(source, server, "web01", {"vol": image})
    print(f"  push: {run.stderr.strip()}")
    check(run.status != 0 and "out of storage" in run.stderr, "refused with 507")
    check(query(server, "SELECT count(*) FROM records") == [(0,)], "no record stored")
    check(integrity(server) == [("ok",)], "integrity_check ok")
    ballast.unlink()

    print(f"2. {image_mib} MiB push, the disk filled by another process during the transfer")
    fill(ballast, (image_mib + 12) * MIB)  # room for the records, not for WAL + checkpoint
    print(f"  {free() / MIB:.1f} MiB free before the push")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "replicore",
            *push_args(source, server, "web01", {"vol": image}, "--max-rate", "20M"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    filler = fs / "filler"

    def fill_when_sending() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (fs / "state" / "replicore.db-wal").exists() and query(
                server, "SELECT count(*) FROM records"
            )[0][0] > 32:
                fill(filler, 0)
                return
            time.sleep(0.05)

    worker = threading.Thread(target=fill_when_sending)
    worker.start()
    out, err = proc.communicate(timeout=300)
    worker.join()
    print(f"  push: exit {proc.returncode} {err.decode().strip()}")
    print(f"  files: {files()}; {free() / MIB:.2f} MiB free")
    log = (work / "server.log").read_text()
    access = [json.loads(line) for line in log.splitlines() if '"replicore.access"' in line]
    statuses = [entry.get("status") for entry in access]
    check(proc.returncode != 0 and "out of storage" in err.decode(), "the push got 507")
    check(500 not in statuses, "no 500 answered (statuses seen: %s)" % sorted(set(statuses)))
    check(server.proc.poll() is None, "the daemon is still running")
    with server.client(source) as client:
        check(client.get("slave/agents").status_code == 200, "it still answers reads")
    check(integrity(server) == [("ok",)], "integrity_check ok while full")
    stored = query(server, "SELECT count(*) FROM records")[0][0]
    print(f"  {stored} records durable before the disk filled")

    print("3. space freed: the push resumes")
    filler.unlink()
    ballast.unlink()
    result = push(source, server, "web01", {"vol": image}).result
    volume = result["volumes"][0]
    print(
        f"  resumed={volume['resumed']} records_sent={result['records_sent']}"
        f" (of {image_mib * 16}); files: {files()}"
    )
    check(volume["resumed"] is True, "the same session resumed")
    check(result["records_sent"] == image_mib * 16 - stored, "only the missing records travelled")
    out_path = work / "export.img"
    exported = server.cli("export", "--agent", "web01", "--volume", "vol", "-o", str(out_path))
    check(exported.status == 0 and sha256(out_path.read_bytes()) == sha256(data), "export exact")
    server.kill()
    server.start()
    follow(server, source)
    check(integrity(server) == [("ok",)], "integrity_check ok after SIGKILL and restart")
    check(verify(server)[0] == 0, "replicore verify clean")
finally:
    if server.proc is not None and server.proc.poll() is None:
        server.stop()

if failures:
    print(f"FAILED: {len(failures)} check(s); server log: {work / 'server.log'}")
    print((work / "server.log").read_text()[-4000:])
    sys.exit(1)
print("all checks passed")
EOF
