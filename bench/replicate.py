#!/usr/bin/env python3
"""Benchmark of the replication data path: `replicore push` to a real `replicore serve` over TLS
on loopback, then `replicore export`, on the disk-like image of the shared bench harness.

Scenarios, in this order, on one target:
    first      push epoch 0 of the image to an empty target
    changed    push after `make_image.py --mutate P` rewrote P% of its 64 KiB blocks
    nochange   push again, nothing changed (the client still reads and hashes everything)
    export     `replicore export` of the latest epoch (compared with the image by hash)
Measured for each: wall seconds of the command, MiB/s of image, bytes on the loopback
interface (`lo` rx counter of /proc/net/dev, both directions, TCP/IP headers included, as
../shared/bench/peers.sh takes it), the client's own count of TLS bytes (`wire_bytes`),
client CPU and peak RSS (wait4 rusage of the child), server CPU (/proc/PID/stat delta) and
server peak RSS during the run (VmHWM, reset before each run through /proc/PID/clear_refs).
Also the storage ceiling: the distinct records of epoch 0, compressed as the client does,
bulk-inserted into a bare SQLite file (rowid table + unique key index, page size, WAL and
synchronous=FULL as the server uses, 256 rows per transaction), timed in the same run before
the server starts: stored bytes / seconds, and the ratio of the first push's time to it.

One JSON line per measurement goes to stdout (and to --results), then a table.  Everything
binds to 127.0.0.1; the server and every command are stopped by PID; each command has a
timeout.  Temp data lives in a fresh temp dir, deleted at the end unless --keep.

    python bench/replicate.py                       # 1024 MiB, 2% changed
    python bench/replicate.py --size-mib 256 --mutate 5
    python bench/replicate.py --size-mib 16384      # the RSS check on a large image (long)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import daemon
from procfs import log, proc_cpu_seconds, proc_status_kib, reset_hwm

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE_TOOL = REPO.parent / "shared" / "bench" / "make_image.py"
PAGE_SIZE = 16384  # as daemon/replicore/store/db.py
AGENT, VOLUME = "bench", "c"
PASSWORD = "bench-password-0123456789"


def lo_rx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


def drop_caches(enabled: bool) -> bool:
    os.sync()
    if not enabled:
        return False
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="replicore-bench."))
        self.image = self.work / "disk.img"
        self.config = self.work / "replicore.toml"
        self.state = self.work / "state"
        self.source_dir = self.work / "source"
        self.server: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.fingerprint = ""
        self.results: list[dict[str, Any]] = []
        self.results_file = open(args.results, "a") if args.results else None  # noqa: SIM115
        self.python = sys.executable

    # -- plumbing ----------------------------------------------------------------------

    def emit(self, record: dict[str, Any]) -> None:
        self.results.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if self.results_file:
            self.results_file.write(line + "\n")
            self.results_file.flush()

    def replicore(self, *args: str) -> list[str]:
        return [self.python, "-m", "replicore", *args]

    def run(
        self, cmd: list[str], *, stdin: str = "", what: str = ""
    ) -> tuple[str, float, resource.struct_rusage]:
        """Run a command with a timeout; returns (stdout, wall seconds, its own rusage)."""
        what = what or " ".join(cmd[3:5])
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=self.work
            )
            assert proc.stdin is not None
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
            timer = threading.Timer(self.args.timeout, proc.kill)
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
            finally:
                timer.cancel()
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(), err.read().decode()
        if proc.returncode == -signal.SIGKILL and wall >= self.args.timeout:
            raise SystemExit(f"{what}: timed out after {self.args.timeout} s")
        if proc.returncode != 0:
            raise SystemExit(f"{what} failed ({proc.returncode}): {stderr.strip()}")
        return stdout, wall, usage

    def timed(self, cmd: list[str], what: str) -> dict[str, Any]:
        """Run one measured command: wall, lo bytes, client CPU/RSS, server CPU/RSS."""
        assert self.server is not None
        cold = drop_caches(self.args.drop_caches)
        hwm_reset = reset_hwm(self.server.pid)
        spy = self.spy(cmd, what)
        lo0, cpu0 = lo_rx_bytes(), proc_cpu_seconds(self.server.pid, children=True)
        out, wall, usage = self.run(cmd, what=what)
        lo1, cpu1 = lo_rx_bytes(), proc_cpu_seconds(self.server.pid, children=True)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        after = self.settle()
        return {
            "out": out,
            "wall_s": round(wall, 3),
            "lo_bytes": lo1 - lo0,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "client_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "server_cpu_s": round(cpu1 - cpu0, 2),
            "server_cpu_after_s": round(after, 2),
            "server_rss_mib": round(proc_status_kib(self.server.pid, "VmHWM") / 1024, 1),
            "server_rss_since_start": not hwm_reset,
            "cold_cache": cold,
        }

    def spy(self, cmd: list[str], what: str) -> subprocess.Popen[bytes] | None:
        """With --profile: record the server and wrap the client command in the profiler
        (its figures then include the profiler's overhead). py-spy writes collapsed Python
        stacks; perf (`--profiler perf`) native stacks of the whole process, kernel too."""
        if self.args.profile is None:
            return None
        assert self.server is not None
        self.args.profile.mkdir(parents=True, exist_ok=True)
        name = what.replace(" ", "-").replace("(", "").replace(")", "")
        out = self.args.profile
        if self.args.profiler == "perf":
            record = ["perf", "record", "-g", "-F", "999"]
            cmd[:0] = [*record, "-o", str(out / f"client-{name}.perf"), "--"]
            server_cmd = [*record, "-o", str(out / f"server-{name}.perf")]
        else:
            pyspy = shutil.which("py-spy") or str(Path(self.python).parent / "py-spy")
            record = [pyspy, "record", "--format", "raw", "--rate", "250", *self.args.profiler_args]
            cmd[:0] = [*record, "-o", str(out / f"client-{name}.txt"), "--"]
            server_cmd = [*record, "-o", str(out / f"server-{name}.txt")]
        server = subprocess.Popen(
            [*server_cmd, "--pid", str(self.server.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # the profiler attaches
        return server

    def settle(self) -> float:
        """Wait until the server stops using CPU after a command (it copies the WAL into
        the database once idle); the CPU seconds it used meanwhile (at most 30 s waited)."""
        assert self.server is not None
        start = last = proc_cpu_seconds(self.server.pid, children=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(1.5)
            now = proc_cpu_seconds(self.server.pid, children=True)
            if now - last < 0.03:
                break
            last = now
        return last - start

    # -- set-up ------------------------------------------------------------------------

    def make_image(self) -> dict[str, Any]:
        tool = self.args.image_tool
        if self.args.image is not None:
            log(f"copying {self.args.image} (made by make_image.py with this --size-mib/--seed)")
            shutil.copyfile(self.args.image, self.image)
            if self.image.stat().st_size != self.args.size_mib * MIB:
                raise SystemExit(f"{self.args.image} is not {self.args.size_mib} MiB")
            return {"blocks_by_kind": "given"}
        log(f"generating a {self.args.size_mib} MiB image with {tool}")
        out, wall, _ = self.run(
            [
                self.python,
                str(tool),
                str(self.image),
                "--size-mib",
                str(self.args.size_mib),
                "--seed",
                str(self.args.seed),
            ],
            what="make_image",
        )
        info: dict[str, Any] = json.loads(out)
        log(f"image ready in {wall:.1f} s: {info['blocks_by_kind']}")
        return info

    def start_server(self) -> None:
        self.config.write_text(
            "[server]\n"
            'listen = "127.0.0.1:0"\n'
            f'state_dir = "{self.state}"\n'
            "shutdown_timeout = 10.0\n"
            "[metrics]\n"
            'listen = ""\n'
        )
        self.server, self.url, self.fingerprint = daemon.start(
            self.replicore("serve", "--config", str(self.config)),
            self.state,
            self.work / "server.log",
            cwd=self.work,
        )
        log(f"server PID {self.server.pid} on {self.url}")

    def pair(self) -> None:
        self.run(
            self.replicore(
                "admin", "add", "bench", "--password-stdin", "--config", str(self.config)
            ),
            stdin=PASSWORD + "\n",
            what="admin add",
        )
        self.run(
            self.replicore(
                "source",
                "pair",
                "--dir",
                str(self.source_dir),
                "--target",
                self.url,
                "--fingerprint",
                self.fingerprint,
                "--agent",
                AGENT,
                "--demand",
                "--user",
                "bench",
                "--password-stdin",
            ),
            stdin=PASSWORD + "\n",
            what="source pair",
        )

    def stop_server(self) -> None:
        daemon.stop(self.server)

    # -- measurements ------------------------------------------------------------------

    def push(self, scenario: str, changed_bytes: int) -> dict[str, Any]:
        cmd = self.replicore(
            "push",
            "--dir",
            str(self.source_dir),
            "--target",
            self.url,
            "--agent",
            AGENT,
            "--volume",
            f"{VOLUME}={self.image}",
            "--streams",
            str(self.args.streams),
            "--json",
        )
        log(f"{scenario}: replicore push")
        m = self.timed(cmd, f"push ({scenario})")
        lines = m.pop("out").splitlines()  # a profiler may print before the push's JSON
        result = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
        volume = result["volumes"][0]
        record = {
            "kind": "run",
            "peer": "replicore",
            "scenario": scenario,
            "size_mib": self.args.size_mib,
            "changed_bytes": changed_bytes,
            **m,
            "mib_s": round(self.args.size_mib / max(m["wall_s"], 1e-9), 1),
            "push_s": result["seconds"],
            "wire_bytes": result["wire_bytes"],
            "records_sent": result["records_sent"],
            "bytes_sent": result["bytes_sent"],
            "raw_bytes_sent": result["raw_bytes_sent"],
            "bytes_read": result["bytes_read"],
            "epoch": volume["epoch"],
            "key_bytes": 8 + 44 * volume["blocks"],
        }
        self.emit(record)
        return record

    def export(self, epoch: int, expected: str, *, timed: bool) -> dict[str, Any] | None:
        output = self.work / f"export-{epoch}.img"
        cmd = self.replicore(
            "export",
            "--agent",
            AGENT,
            "--volume",
            VOLUME,
            "--epoch",
            str(epoch),
            "-o",
            str(output),
            "--config",
            str(self.config),
        )
        record = None
        if timed:
            log(f"export of epoch {epoch}")
            m = self.timed(cmd, "export")
            m.pop("out")
            record = {
                "kind": "run",
                "peer": "replicore",
                "scenario": "export",
                "size_mib": self.args.size_mib,
                "changed_bytes": 0,
                **m,
                "mib_s": round(self.args.size_mib / max(m["wall_s"], 1e-9), 1),
                "epoch": epoch,
            }
        else:
            self.run(cmd, what=f"export of epoch {epoch}")
        actual = daemon.sha256_file(output)
        output.unlink()
        verify = "ok" if actual == expected else "FAIL"
        if record is not None:
            record["verify"] = verify
            self.emit(record)
        else:
            self.emit({"kind": "verify", "epoch": epoch, "verify": verify})
        if verify != "ok":
            log(f"export of epoch {epoch} differs from the image it was pushed from")
        return record

    def prepare_ceiling(self) -> tuple[int, int]:
        """Write the image's distinct records, compressed as the client does, to a flat file
        (not timed); returns (records, stored bytes)."""
        sys.path.insert(0, str(REPO / "daemon"))
        from replicore import protocol

        block = protocol.DEFAULT_BLOCK_SIZE
        seen: set[bytes] = set()
        stored = 0
        log("storage ceiling: compressing the distinct records of epoch 0 (not timed)")
        with self.image.open("rb") as image, (self.work / "records.bin").open("wb") as out:
            while data := image.read(8 * MIB):
                view = memoryview(data)
                for start in range(0, len(view), block):
                    raw = view[start : start + block]
                    key = protocol.record_key(raw)
                    if key in seen:
                        continue
                    seen.add(key)
                    codec, payload = protocol.compress_block(raw)
                    out.write(key + len(payload).to_bytes(4, "big") + bytes([codec]) + payload)
                    stored += len(payload)
        return len(seen), stored

    def storage_ceiling(self, count: int, stored: int) -> dict[str, Any]:
        """Bulk-insert the prepared records into a bare SQLite file, timed."""
        records = self.work / "records.bin"
        db = self.work / "ceiling.db"
        drop_caches(self.args.drop_caches)
        log("storage ceiling: bulk insert")
        started = time.perf_counter()
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(
            "CREATE TABLE records (id INTEGER PRIMARY KEY, key BLOB NOT NULL,"
            " codec INTEGER NOT NULL, data BLOB NOT NULL)"
        )
        conn.execute("CREATE UNIQUE INDEX records_key ON records(key)")
        rows: list[tuple[bytes, int, bytes]] = []
        with records.open("rb") as f:
            while head := f.read(37):
                size = int.from_bytes(head[32:36], "big")
                rows.append((head[:32], head[36], f.read(size)))
                if len(rows) == 256:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany("INSERT INTO records(key, codec, data) VALUES (?,?,?)", rows)
                    conn.execute("COMMIT")
                    rows = []
        if rows:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO records(key, codec, data) VALUES (?,?,?)", rows)
            conn.execute("COMMIT")
        conn.close()
        seconds = time.perf_counter() - started
        size = sum(p.stat().st_size for p in self.work.glob("ceiling.db*"))
        for p in self.work.glob("ceiling.db*"):
            p.unlink()
        records.unlink()
        record = {
            "kind": "ceiling",
            "name": "sqlite_bulk_insert",
            "size_mib": self.args.size_mib,
            "records": count,
            "stored_bytes": stored,
            "file_bytes": size,
            "wall_s": round(seconds, 3),
            "stored_mib_s": round(stored / MIB / seconds, 1),
        }
        self.emit(record)
        return record

    def server_stored_bytes(self) -> int:
        conn = sqlite3.connect(f"file:{self.state / 'replicore.db'}?mode=ro", uri=True)
        try:
            return int(
                conn.execute("SELECT coalesce(sum(stored_length), 0) FROM records").fetchone()[0]
            )
        finally:
            conn.close()

    # -- the run -----------------------------------------------------------------------

    def main(self) -> int:
        args = self.args
        log(f"work dir {self.work}")
        info = self.make_image()
        epoch0 = daemon.sha256_file(self.image)
        self.emit(
            {
                "kind": "env",
                "size_mib": args.size_mib,
                "change_pct": args.mutate,
                "seed": args.seed,
                "streams": args.streams,
                "python": platform.python_version(),
                "kernel": platform.release(),
                "nproc": os.cpu_count(),
                "image_sha256": epoch0[:16],
                "blocks_by_kind": info["blocks_by_kind"],
            }
        )
        # A regular install compiles the modules; an editable one (and PYTHONDONTWRITEBYTECODE)
        # would leave every command compiling them again at each start.
        self.run([self.python, "-m", "compileall", "-q", str(REPO / "daemon")], what="compileall")
        ceiling = self.storage_ceiling(*self.prepare_ceiling()) if args.ceiling else None
        self.start_server()
        self.pair()
        first = self.push("first", 0)
        if args.first_only:
            return 0
        log(f"mutating {args.mutate}% of the blocks")
        out, _, _ = self.run(
            [
                self.python,
                str(args.image_tool),
                str(self.image),
                "--mutate",
                str(args.mutate),
                "--seed",
                str(args.seed + 1),
            ],
            what="make_image --mutate",
        )
        changed_bytes = json.loads(out)["changed_bytes"]
        epoch1 = daemon.sha256_file(self.image)
        self.push("changed", changed_bytes)
        self.push("nochange", 0)
        self.export(3, epoch1, timed=True)
        self.export(1, epoch0, timed=False)
        self.export(2, epoch1, timed=False)
        stored = self.server_stored_bytes()
        self.stop_server()
        if ceiling is None:
            self.table()
            return 1 if any(r.get("verify") == "FAIL" for r in self.results) else 0
        self.emit(
            {
                "kind": "ratio",
                "name": "first_push_vs_storage_ceiling",
                "server_stored_bytes": stored,
                "first_push_s": first["wall_s"],
                "ceiling_s": ceiling["wall_s"],
                "time_ratio": round(first["wall_s"] / ceiling["wall_s"], 2),
                "push_time_ratio": round(first["push_s"] / ceiling["wall_s"], 2),
                "first_push_stored_mib_s": round(stored / MIB / first["wall_s"], 1),
                "ceiling_stored_mib_s": ceiling["stored_mib_s"],
            }
        )
        self.table()
        failed = [r for r in self.results if r.get("verify") == "FAIL"]
        return 1 if failed else 0

    def table(self) -> None:
        env = next(r for r in self.results if r["kind"] == "env")
        size = env["size_mib"]
        print()
        print(
            f"replicore push/export, {size} MiB image, {env['change_pct']}% of 64 KiB blocks "
            f"changed for 'changed'; {env['nproc']} CPUs, Python {env['python']}, "
            f"{env['streams']} streams"
        )
        head = (
            "scenario",
            "wall_s",
            "push_s",
            "MiB/s",
            "cpu_s",
            "srv_cpu",
            "+after",
            "rss_MiB",
            "srv_rss",
            "lo_MiB",
            "wire_MiB",
            "records",
            "verify",
        )
        print(
            "{:<9} {:>7} {:>7} {:>7} {:>6} {:>7} {:>6} {:>7} {:>7} {:>8} {:>8} {:>7} {:>6}".format(
                *head
            )
        )
        for r in self.results:
            if r["kind"] != "run":
                continue
            push_s = f"{r['push_s']:.2f}" if "push_s" in r else "-"
            wire = f"{r['wire_bytes'] / MIB:.2f}" if "wire_bytes" in r else "-"
            print(
                f"{r['scenario']:<9} {r['wall_s']:>7.2f} {push_s:>7} {r['mib_s']:>7.0f} "
                f"{r['cpu_s']:>6.2f} {r['server_cpu_s']:>7.2f} {r['server_cpu_after_s']:>6.2f} "
                f"{r['client_rss_mib']:>7.1f} "
                f"{r['server_rss_mib']:>7.1f} {r['lo_bytes'] / MIB:>8.2f} {wire:>8} "
                f"{r.get('records_sent', '-')!s:>7} {r.get('verify', '-'):>6}"
            )
        for r in self.results:
            if r["kind"] == "ceiling":
                print(
                    f"\nstorage ceiling: {r['records']} records, {r['stored_bytes'] / MIB:.1f} "
                    f"MiB stored, bulk insert into bare SQLite {r['wall_s']:.2f} s "
                    f"({r['stored_mib_s']:.0f} MiB/s)"
                )
            if r["kind"] == "ratio":
                print(
                    f"first push / storage ceiling: {r['time_ratio']:.2f}x the time "
                    f"({r['push_time_ratio']:.2f}x by the push's own clock) "
                    f"({r['first_push_stored_mib_s']:.0f} vs {r['ceiling_stored_mib_s']:.0f} "
                    "MiB/s of stored bytes)"
                )
        print(
            "\nwall_s: the command (`replicore push`/`export`, interpreter start included); "
            "push_s: the push's own clock.\ncpu_s/rss_MiB: the client command; srv_cpu/srv_rss: "
            "the server during the run (peak RSS reset before each run);\n+after: server CPU "
            "after the command, until it is idle (the WAL checkpoint it defers to idle time)."
            "\nlo_MiB: loopback "
            "rx bytes (both directions, headers included; other loopback users count too); "
            "wire_MiB: the client's count of TLS bytes."
        )

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_server()
        if self.results_file:
            self.results_file.close()
        if self.args.keep:
            log(f"work dir kept: {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    parser.add_argument(
        "--mutate", type=float, default=2.0, help="percent of blocks changed (default 2)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument(
        "--image-tool",
        type=Path,
        default=DEFAULT_IMAGE_TOOL,
        help=f"make_image.py of the shared bench harness (default {DEFAULT_IMAGE_TOOL})",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds allowed per command (default 900)"
    )
    parser.add_argument(
        "--no-drop-caches",
        dest="drop_caches",
        action="store_false",
        help="do not drop the page cache before each timed run (it is, when allowed)",
    )
    parser.add_argument(
        "--image",
        type=Path,
        help="copy this epoch-0 image (from make_image.py with the same --size-mib and "
        "--seed) instead of generating it",
    )
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip the storage ceiling (it needs about 2x the stored bytes of disk)",
    )
    parser.add_argument("--results", type=Path, help="also append the JSON lines to this file")
    parser.add_argument(
        "--profile",
        type=Path,
        help="write py-spy collapsed stacks of server and client for each run to this dir",
    )
    parser.add_argument("--profiler", choices=("py-spy", "perf"), default="py-spy")
    parser.add_argument(
        "--profiler-arg",
        dest="profiler_args",
        action="append",
        default=[],
        help="extra py-spy argument (repeatable), e.g. --profiler-arg=--gil",
    )
    parser.add_argument("--first-only", action="store_true", help="stop after the first push")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    if not args.image_tool.is_file():
        parser.error(f"no image tool at {args.image_tool}: pass --image-tool PATH")
    bench = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return bench.main()
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
