#!/usr/bin/env python3
"""Load test: many sources pushing at once while readers poll the control endpoints, against
one real `replicore serve` over TLS on loopback.

    python bench/load.py [--sources 20] [--readers 5] [--seconds 60] [--size-mib 64]
                         [--mutate 2] [--client-nice 10] [--keep] [--results FILE]

1. Set-up (not measured as load): a server in a temp dir, an administrator, one base image
   made with ../shared/bench/make_image.py, and per source its own identity (key and
   certificate), paired by demand with one agent (`web01`: every source uses the same agent
   id, in its own repository), and its own copy of the image, diverged with `--mutate`.
2. Seeding: every source pushes its whole image at once (its epoch 1), each a `replicore
   push` process; reported separately.
3. Load, for `--seconds`: each source, in its own loop, changes `--mutate` % of its image's
   64 KiB blocks (`make_image.py --mutate`) and runs `replicore push --json` (a separate
   process each time); meanwhile `--readers` separate processes poll the inventory and
   control endpoints (slave/agents with each view, an agent, its rps, rpsCount, a page of
   rps, replicatedVolumeImagesNew, replicatedagents/rpsinfo, repositories,
   agentRepositoryRelationships, and the anonymous noPairingSummaryInfo), each as a paired
   source, recording every request's latency. A push started before the end runs to its end.

Reported (one JSON object on stdout, a table on stderr): pushes done and failed, throughput
in MiB/s of image read by the sources and of TLS bytes on the wire (the clients' own count,
both directions), per-push seconds p50/p99, control endpoint latency p50/p99/max overall and
per endpoint, errors (a push exiting non-zero, a poll answered non-2xx or failing), server
CPU seconds and peak RSS (VmHWM of /proc/PID/status, reset after seeding through clear_refs
when permitted, so the load figure is the load's own).

The load generators share the machine with the server, unlike real sources: they run with
`--client-nice` (default 10) so that the server and the readers, which measure latency, are
scheduled first; say so when quoting figures. Everything binds to 127.0.0.1; processes are
stopped by PID; the temp dir is removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import daemon
from procfs import log, proc_cpu_seconds, proc_status_kib, reset_hwm

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
IMAGE_TOOL = REPO.parent / "shared" / "bench" / "make_image.py"
AGENT, VOLUME = "web01", "c"
ADMIN, PASSWORD = "bench", "bench-password-0123456789"
#: Control endpoints the readers poll (relative to .../replicationcomms/); `{agent}` is AGENT.
CONTROL = [
    "slave/agents",
    "slave/agents?view=usage",
    "slave/agents?view=all",
    "slave/agents/{agent}",
    "slave/agents/{agent}/rps",
    "slave/agents/{agent}/rpsCount",
    "slave/agents/{agent}/skipCount/0/maxCount/10/rps",
    "slave/agents/{agent}/replicatedVolumeImagesNew",
    "slave/replicatedagents/rpsinfo",
    "slave/repositories",
    "slave/cores/agentRepositoryRelationships",
    "slave/cores/noPairingSummaryInfo",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def thread_schedstats(pid: int) -> dict[int, tuple[int, int]]:
    """Per thread of the process: (ns on a CPU, ns waiting on a run queue)."""
    found: dict[int, tuple[int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            on_cpu, waiting, _ = Path(task, "schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        found[int(task.name)] = (int(on_cpu), int(waiting))
    return found


# --------------------------------------------------------------------------------------
# Readers (separate processes)
# --------------------------------------------------------------------------------------


def reader(
    number: int, url: str, pem: str, source_dir: str, until: float, interval: float, out: str
) -> None:
    """Poll the control endpoints round robin until `until` (time.time()); one JSON line per
    request (endpoint, status, seconds) to `out`."""
    sys.path.insert(0, str(REPO / "daemon"))
    from replicore.source import connection, identity

    source = identity.load(Path(source_dir))
    paths = [p.format(agent=AGENT) for p in CONTROL]
    position = number
    with connection.client(url, pem, source, timeout=30.0) as client, open(out, "w") as f:
        while time.time() < until:
            template = CONTROL[position % len(CONTROL)]
            path = paths[position % len(paths)]
            position += 1
            started = time.perf_counter()
            try:
                status = client.get(path).status_code
                error = ""
            except Exception as exc:  # a failed poll is an error of the run, not of the reader
                status, error = 0, f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - started
            f.write(
                json.dumps({"endpoint": template, "status": status, "s": seconds, "error": error})
                + "\n"
            )
            time.sleep(interval)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="replicore-load."))
        self.config = self.work / "replicore.toml"
        self.state = self.work / "state"
        self.server: subprocess.Popen[bytes] | None = None
        self.url = self.fingerprint = self.pem = ""
        self.python = sys.executable
        self.sources: list[Path] = []
        self.lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------

    def replicore(self, *args: str) -> list[str]:
        return [self.python, "-m", "replicore", *args]

    def nice(self) -> None:
        os.nice(self.args.client_nice)

    def run(self, cmd: list[str], *, stdin: str = "", niced: bool = False) -> tuple[int, str, str]:
        proc = subprocess.run(
            cmd,
            input=stdin.encode(),
            capture_output=True,
            timeout=self.args.timeout,
            cwd=self.work,
            preexec_fn=self.nice if niced else None,
        )
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()

    def start_server(self) -> None:
        self.config.write_text(
            "[server]\n"
            'listen = "127.0.0.1:0"\n'
            f'state_dir = "{self.state}"\n'
            "shutdown_timeout = 10.0\n"
            "[metrics]\n"
            'listen = ""\n'
            "[log]\n"
            'level = "info"\n'
        )
        env = dict(os.environ)
        for setting in self.args.server_env:
            name, _, value = setting.partition("=")
            env[name] = value
        self.server, self.url, self.fingerprint = daemon.start(
            self.replicore("serve", "--config", str(self.config)),
            self.state,
            self.work / "server.log",
            cwd=self.work,
            env=env,
        )
        log(f"server PID {self.server.pid} on {self.url}")

    def stop_server(self) -> None:
        daemon.stop(self.server)

    # -- set-up --------------------------------------------------------------------------

    def setup(self) -> None:
        sys.path.insert(0, str(REPO / "daemon"))
        from replicore.source import connection, identity, pairing

        status, _, err = self.run(
            self.replicore("admin", "add", ADMIN, "--password-stdin", "--config", str(self.config)),
            stdin=PASSWORD + "\n",
        )
        if status:
            raise SystemExit(f"admin add: {err}")
        self.pem = connection.pin(self.url, self.fingerprint)
        base = self.work / "base.img"
        log(f"making a {self.args.size_mib} MiB image with {IMAGE_TOOL}")
        status, _, err = self.run(
            [self.python, str(IMAGE_TOOL), str(base), "--size-mib", str(self.args.size_mib)]
        )
        if status:
            raise SystemExit(f"make_image: {err}")

        def prepare(number: int) -> Path:
            directory = self.work / f"source{number:02d}"
            source = identity.init(directory)
            pairing.pair(
                source,
                self.url,
                self.fingerprint,
                [AGENT],
                demand_credentials=(ADMIN, PASSWORD),
            )
            image = directory / "disk.img"
            shutil.copyfile(base, image)
            self.mutate(image, seed=1000 + number)
            return directory

        with ThreadPoolExecutor(4) as pool:
            self.sources = list(pool.map(prepare, range(self.args.sources)))
        log(f"{len(self.sources)} sources paired by demand, each with its own image")

    def mutate(self, image: Path, seed: int) -> None:
        status, _, err = self.run(
            [
                self.python,
                str(IMAGE_TOOL),
                str(image),
                "--mutate",
                str(self.args.mutate),
                "--seed",
                str(seed),
            ],
            niced=True,
        )
        if status:
            raise RuntimeError(f"make_image --mutate: {err}")

    def push(self, source: Path) -> dict[str, Any]:
        """One `replicore push` of the source's image; its JSON result, or an error."""
        started = time.monotonic()
        status, out, err = self.run(
            self.replicore(
                "push",
                "--dir",
                str(source),
                "--target",
                self.url,
                "--agent",
                AGENT,
                "--volume",
                f"{VOLUME}={source / 'disk.img'}",
                "--streams",
                str(self.args.streams),
                "--json",
            ),
            niced=True,
        )
        wall = time.monotonic() - started
        if status != 0:
            return {"error": err.strip() or f"exit {status}", "wall_s": wall}
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result["wall_s"] = wall
        return result

    # -- phases --------------------------------------------------------------------------

    def seed(self) -> dict[str, Any]:
        assert self.server is not None
        log(f"seeding: {len(self.sources)} full pushes of {self.args.size_mib} MiB at once")
        cpu0, started = proc_cpu_seconds(self.server.pid), time.monotonic()
        with ThreadPoolExecutor(len(self.sources)) as pool:
            results = list(pool.map(self.push, self.sources))
        elapsed = time.monotonic() - started
        summary = self.push_summary(results, elapsed)
        summary["server_cpu_s"] = round(proc_cpu_seconds(self.server.pid) - cpu0, 1)
        summary["server_peak_rss_mib"] = round(proc_status_kib(self.server.pid, "VmHWM") / 1024, 1)
        return summary

    def load(self) -> dict[str, Any]:
        assert self.server is not None
        pid = self.server.pid
        hwm_reset = reset_hwm(pid)
        until = time.time() + self.args.seconds
        context = multiprocessing.get_context("spawn")
        outs = [self.work / f"reader{i}.jsonl" for i in range(self.args.readers)]
        readers = [
            context.Process(
                target=reader,
                args=(
                    i,
                    self.url,
                    self.pem,
                    str(self.sources[i % len(self.sources)]),
                    until,
                    self.args.poll_interval,
                    str(outs[i]),
                ),
            )
            for i in range(self.args.readers)
        ]
        rss_peak = 0
        stop_sampling = threading.Event()
        first = thread_schedstats(pid)
        last: dict[int, tuple[int, int]] = dict(first)

        def sample() -> None:
            nonlocal rss_peak
            while not stop_sampling.wait(0.25):
                rss_peak = max(rss_peak, proc_status_kib(pid, "VmRSS"))
                last.update(thread_schedstats(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        results: list[dict[str, Any]] = []

        def loop(number: int, source: Path) -> None:
            iteration = 0
            while time.time() < until:
                iteration += 1
                self.mutate(source / "disk.img", seed=number * 100_000 + iteration)
                result = self.push(source)
                with self.lock:
                    results.append(result)

        log(
            f"load: {len(self.sources)} sources pushing ({self.args.mutate}% changed per push),"
            f" {self.args.readers} readers polling, for {self.args.seconds} s"
        )
        cpu0, started = proc_cpu_seconds(pid), time.monotonic()
        sampler.start()
        for process in readers:
            process.start()
        with ThreadPoolExecutor(len(self.sources)) as pool:
            for number, source in enumerate(self.sources):
                pool.submit(loop, number, source)
        elapsed = time.monotonic() - started
        for process in readers:
            process.join(60)
            if process.is_alive():
                process.kill()
        stop_sampling.set()
        sampler.join()
        summary = self.push_summary(results, elapsed)
        summary["server_cpu_s"] = round(proc_cpu_seconds(pid) - cpu0, 1)
        summary["server_cpu_share"] = round(summary["server_cpu_s"] / elapsed, 2)
        summary["server_peak_rss_mib"] = round(proc_status_kib(pid, "VmHWM") / 1024, 1)
        summary["server_peak_rss_is_since_start"] = not hwm_reset
        summary["server_sampled_peak_rss_mib"] = round(rss_peak / 1024, 1)
        on_cpu = waiting = 0
        for tid, (cpu_ns, wait_ns) in last.items():
            cpu0, wait0 = first.get(tid, (0, 0))
            on_cpu += cpu_ns - cpu0
            waiting += wait_ns - wait0
        summary["server_threads_on_cpu_s"] = round(on_cpu / 1e9, 1)
        summary["server_threads_runqueue_wait_s"] = round(waiting / 1e9, 1)
        summary["control"] = self.control_summary(outs)
        summary["control_server_side"] = self.server_side(until - self.args.seconds, until)
        summary["load_average"] = os.getloadavg()
        return summary

    def server_side(self, start: float, end: float) -> dict[str, Any]:
        """Latency of the control endpoints as the server measured it (its access log: from
        the request's arrival to its last response byte), during the load."""
        wanted = {p.split("?")[0] for p in CONTROL}
        ms: list[float] = []
        for line in (self.work / "server.log").read_text().splitlines():
            if '"replicore.access"' not in line:
                continue
            entry = json.loads(line)
            endpoint = entry.get("endpoint", "").replace("<agent_id>", "{agent}")
            endpoint = endpoint.replace("<skip_count>", "0").replace("<max_count>", "10")
            if endpoint in wanted and entry.get("method") == "GET":
                ms.append(float(entry["duration_ms"]))
        return {
            "requests": len(ms),
            "p50_ms": round(percentile(ms, 50), 1),
            "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1) if ms else 0.0,
        }

    # -- figures -------------------------------------------------------------------------

    def push_summary(self, results: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
        done = [r for r in results if "error" not in r]
        failed = [r for r in results if "error" in r]
        read = sum(r["bytes_read"] for r in done)
        wire = sum(r["wire_bytes"] for r in done)
        walls = [r["wall_s"] for r in done]
        return {
            "seconds": round(elapsed, 1),
            "pushes": len(done),
            "push_errors": len(failed),
            "push_error_samples": sorted({r["error"][:300] for r in failed})[:5],
            "image_mib": round(read / MIB, 1),
            "image_mib_s": round(read / MIB / elapsed, 1),
            "wire_mib": round(wire / MIB, 1),
            "wire_mib_s": round(wire / MIB / elapsed, 2),
            "records_sent": sum(r["records_sent"] for r in done),
            "push_wall_s_p50": round(percentile(walls, 50), 2),
            "push_wall_s_p99": round(percentile(walls, 99), 2),
            "push_own_s_p50": round(percentile([r["seconds"] for r in done], 50), 2),
        }

    def control_summary(self, outs: list[Path]) -> dict[str, Any]:
        entries = [
            json.loads(line)
            for out in outs
            if out.exists()
            for line in out.read_text().splitlines()
            if line
        ]
        errors = [e for e in entries if not 200 <= e["status"] < 300]
        ms = [e["s"] * 1000 for e in entries]
        by_endpoint: dict[str, Any] = {}
        for template in CONTROL:
            values = [e["s"] * 1000 for e in entries if e["endpoint"] == template]
            if values:
                by_endpoint[template] = {
                    "n": len(values),
                    "p50_ms": round(percentile(values, 50), 1),
                    "p99_ms": round(percentile(values, 99), 1),
                    "max_ms": round(max(values), 1),
                }
        return {
            "requests": len(entries),
            "errors": len(errors),
            "error_samples": [
                f"{e['endpoint']}: {e['status']} {e['error']}"[:200] for e in errors[:5]
            ],
            "p50_ms": round(percentile(ms, 50), 1),
            "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1) if ms else 0.0,
            "mean_ms": round(statistics.fmean(ms), 1) if ms else 0.0,
            "by_endpoint": by_endpoint,
        }


def table(report: dict[str, Any]) -> str:
    load, seed, control = report["load"], report["seeding"], report["load"]["control"]
    lines = [
        f"seeding: {seed['pushes']} full pushes in {seed['seconds']} s, {seed['push_errors']}"
        f" errors, {seed['image_mib_s']} MiB/s of image, {seed['wire_mib_s']} MiB/s on the"
        f" wire, server peak RSS {seed['server_peak_rss_mib']} MiB",
        f"load ({load['seconds']} s): {load['pushes']} pushes, {load['push_errors']} errors;"
        f" {load['image_mib_s']} MiB/s of image, {load['wire_mib_s']} MiB/s on the wire;"
        f" push wall p50 {load['push_wall_s_p50']} s p99 {load['push_wall_s_p99']} s",
        f"control: {control['requests']} requests, {control['errors']} errors,"
        f" p50 {control['p50_ms']} ms, p99 {control['p99_ms']} ms, max {control['max_ms']} ms"
        f" (server side: p50 {load['control_server_side']['p50_ms']} ms,"
        f" p99 {load['control_server_side']['p99_ms']} ms); load average"
        f" {', '.join(f'{x:.1f}' for x in load['load_average'])}",
        f"server: {load['server_cpu_s']} CPU s ({load['server_cpu_share']} cores), its threads"
        f" waited {load['server_threads_runqueue_wait_s']} s for a CPU;"
        f" peak RSS {load['server_peak_rss_mib']} MiB during the load",
        "",
        f"{'endpoint':<52} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    for name, figures in control["by_endpoint"].items():
        lines.append(
            f"{name:<52} {figures['n']:>5} {figures['p50_ms']:>8} {figures['p99_ms']:>8}"
            f" {figures['max_ms']:>8}"
        )
    aims = report["aims"]
    lines.append("")
    lines.append(
        "aims: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in aims.items())
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--readers", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--mutate", type=float, default=2.0, help="%% of blocks changed per push")
    parser.add_argument(
        "--poll-interval", type=float, default=0.1, help="pause of a reader between requests"
    )
    parser.add_argument(
        "--client-nice", type=int, default=10, help="niceness of the push and mutate processes"
    )
    parser.add_argument("--streams", type=int, default=4, help="push --streams (default 4)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per command")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the server process (e.g. MALLOC_ARENA_MAX=2); repeatable",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--results", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    if not IMAGE_TOOL.exists():
        raise SystemExit(f"{IMAGE_TOOL} not found (the shared bench folder, ../shared)")
    if args.readers > args.sources:
        raise SystemExit("--readers must not exceed --sources (each reader is a source)")

    bench = Load(args)
    try:
        bench.start_server()
        bench.setup()
        seeding = bench.seed()
        loaded = bench.load()
        report = {
            "server_env": args.server_env,
            "sources": args.sources,
            "readers": args.readers,
            "size_mib": args.size_mib,
            "mutate_percent": args.mutate,
            "streams": args.streams,
            "client_nice": args.client_nice,
            "cpus": os.cpu_count(),
            "seeding": seeding,
            "load": loaded,
        }
        report["aims"] = {
            "0 errors": loaded["push_errors"] == 0
            and loaded["control"]["errors"] == 0
            and seeding["push_errors"] == 0,
            "control p99 < 200 ms": loaded["control"]["p99_ms"] < 200,
            "server RSS < 500 MiB": max(
                loaded["server_peak_rss_mib"], seeding["server_peak_rss_mib"]
            )
            < 500,
        }
    finally:
        bench.stop_server()
        if args.keep:
            log(f"kept {bench.work}")
        else:
            shutil.rmtree(bench.work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if args.results:
        args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
