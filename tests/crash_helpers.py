"""The crash-consistency harness: SIGKILL at random moments of pushes, commits, agent
deletions, garbage collection and seed-drive consumption; after each kill, restart, check the
database (`PRAGMA integrity_check`, `foreign_key_check`, `replicore verify`), finish what
was interrupted, and export every new volume image (and a sample of older ones) comparing
bytes. Used by tests/test_crash.py (a handful of kill points in CI) and by
tests/long/crash_harness.py (the long run).

Kill points by kind:
- push: a `replicore push` subprocess of a changed image; the server is killed at a random
  moment of the push's measured duration (opening, key negotiation, rawdata, commit). Then
  the same push is run again and must complete.
- commit: a background commit (`slave/start/...`) of an image of many 4 KiB blocks, killed
  at a random moment of a commit's measured duration; after the restart the image is either
  committed whole or its session is still open, and committing again succeeds.
- delete: `DELETE slave/agents/{id}` of an agent with data, killed at a random moment; the
  agent is then either whole (its images export exactly) or in the recycle bin.
- gc: `replicore gc` (a subprocess: the collector is the writer) over the garbage of a purged
  agent, killed together with the server at a random moment; collecting again succeeds and
  no live image loses a record.
- seed: `replicore seed-drive consume` (a subprocess), killed together with the server; the
  drive is then consumed whole or not at all, and consuming it again completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from datapath_helpers import DataPathClient, key_entries, keys_checksum, split
from faults_helpers import follow, integrity, query, verify
from pairing_helpers import pair_by_demand
from push_helpers import push, push_process, sha256
from replicore.source import identity

KINDS = ("push", "commit", "delete", "gc", "seed")
BLOCK = 64 * 1024
MIB = 1024 * 1024
COMMIT_BLOCK = 4096


class HarnessFailure(AssertionError):
    """A kill point left something wrong; the message says what."""


def disk_image(rng: random.Random, blocks: int) -> bytes:
    """A disk-like image: about 30% zero blocks, 30% compressible, 40% random."""
    out = bytearray()
    for _ in range(blocks):
        roll = rng.random()
        if roll < 0.3:
            out += bytes(BLOCK)
        elif roll < 0.6:
            out += rng.randbytes(1024) * (BLOCK // 1024)
        else:
            out += rng.randbytes(BLOCK)
    return bytes(out)


def change_blocks(path: Path, rng: random.Random, percent: float) -> int:
    """Rewrite `percent` % of the image's 64 KiB blocks with random bytes; how many."""
    blocks = path.stat().st_size // BLOCK
    chosen = rng.sample(range(blocks), max(1, int(blocks * percent / 100)))
    with path.open("r+b") as f:
        for index in chosen:
            f.seek(index * BLOCK)
            f.write(rng.randbytes(BLOCK))
    return len(chosen)


@dataclass
class KillPoint:
    number: int
    kind: str
    delay: float = 0.0
    #: What had happened when the process died, as found after the restart.
    phase: str = ""
    seconds: float = 0.0
    ok: bool = False
    error: str = ""

    def line(self) -> str:
        outcome = "ok" if self.ok else f"FAILED: {self.error}"
        return (
            f"#{self.number:03d} {self.kind:<6} killed after {self.delay:5.3f} s:"
            f" {self.phase or '?'} -> {outcome} ({self.seconds:.1f} s)"
        )


@dataclass
class Harness:
    """Runs kill points against `server` (a tests.conftest.RunningServer)."""

    server: Any
    work: Path
    admin: tuple[str, str]
    seed: int = 1
    #: Size of the pushed image in MiB.
    image_mib: int = 16
    log: Callable[[str], None] = print
    rng: random.Random = field(init=False)
    source: identity.Identity = field(init=False)
    #: (agent, volume, epoch) -> SHA-256 of the image as pushed.
    expected: dict[tuple[str, str, int], str] = field(default_factory=dict)
    #: Seconds of work after progress is first seen (learned as runs finish).
    durations: dict[str, float] = field(default_factory=lambda: {"gc": 0.15, "seed": 0.2})
    points: list[KillPoint] = field(default_factory=list)
    spare_agents: list[str] = field(default_factory=list)
    garbage_agents: list[str] = field(default_factory=list)
    garbage_pushed_at: float = 0.0
    bulk: bytes = b""
    bulk_epoch: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(f"crash-harness:{self.seed}")
        self.work.mkdir(parents=True, exist_ok=True)
        self.source = identity.init(self.work / "source")

    # ------------------------------------------------------------------ set-up

    def setup(self, spare_agents: int, garbage_agents: int = 0) -> None:
        """Pair the source (web01 for pushes, bulk for commits, spares for deletions and
        seed drives, garbage agents whose data gc points delete), make the first images,
        timing an uninterrupted run of each, and push the garbage agents' data now (gc only
        collects records older than the session timeout)."""
        self.spare_agents = [f"spare{i:03d}" for i in range(spare_agents)]
        self.garbage_agents = [f"garbage{i:03d}" for i in range(garbage_agents)]
        pair_by_demand(
            self.server,
            self.source,
            ["web01", "bulk", *self.spare_agents, *self.garbage_agents],
            self.admin,
        )
        for agent in self.garbage_agents:
            image = self.work / f"{agent}.img"
            image.write_bytes(self.rng.randbytes(8 * MIB))
            self._push_ok(agent, image)
        self.garbage_pushed_at = time.time()
        image = self.work / "web01.img"
        image.write_bytes(disk_image(self.rng, self.image_mib * MIB // BLOCK))
        self._push_ok("web01", image)
        change_blocks(image, self.rng, 10)
        started = time.monotonic()
        proc = push_process(self.source, self.server, "web01", {"vol": image})
        epochs = len(self._epochs("web01", "vol"))
        while not self._web01_session_open() and proc.poll() is None:
            time.sleep(0.01)
        opened = time.monotonic()
        while len(self._epochs("web01", "vol")) == epochs and proc.poll() is None:
            time.sleep(0.01)
        committed = time.monotonic()
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise HarnessFailure(f"an uninterrupted push failed: {err.decode()}")
        self.durations["push_start"] = opened - started
        self.durations["push"] = max(0.05, committed - opened)
        self._settle("web01", "vol", sha256(image.read_bytes()))
        # The bulk agent: an image of many small blocks, so a commit has work to do.
        self.bulk = bytes(64 * MIB)
        self._commit_bulk(self.bulk, background=False)
        self.log(
            f"set up: a push of {self.image_mib} MiB opens its session after"
            f" {self.durations['push_start']:.2f} s and has committed"
            f" {self.durations['push']:.2f} s later; a commit of"
            f" {len(self.bulk) // COMMIT_BLOCK} blocks takes {self.durations['commit']:.2f} s"
        )

    # ------------------------------------------------------------------ running

    def run(self, kinds: list[str]) -> list[KillPoint]:
        """One kill point per entry of `kinds`; stops at the first failure (raised)."""
        for kind in kinds:
            point = KillPoint(len(self.points) + 1, kind)
            self.points.append(point)
            started = time.monotonic()
            try:
                getattr(self, f"_point_{kind}")(point)
                self._check_sample()
                point.ok = True
            except BaseException as error:
                point.error = f"{type(error).__name__}: {error}"
                raise
            finally:
                point.seconds = time.monotonic() - started
                self.log(point.line())
        return self.points

    def final_check(self) -> None:
        """Every image pushed so far still exports exactly."""
        self._check_database()
        for (agent, volume, epoch), digest in sorted(self.expected.items()):
            self._export_equal(agent, volume, epoch, digest)

    def summary(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        for point in self.points:
            by_kind[point.kind] = by_kind.get(point.kind, 0) + 1
        return {
            "killPoints": len(self.points),
            "ok": sum(p.ok for p in self.points),
            "byKind": by_kind,
            "phases": [f"{p.kind}: {p.phase}" for p in self.points],
            "imagesChecked": len(self.expected),
        }

    # ------------------------------------------------------------------ checks

    def _restart(self) -> None:
        self.server.start()
        follow(self.server, self.source)

    def _kill_server(self) -> None:
        if self.server.proc is not None and self.server.proc.poll() is None:
            self.server.kill()

    def _check_database(self) -> None:
        found = integrity(self.server)
        if found != [("ok",)]:
            raise HarnessFailure(f"integrity_check / foreign_key_check: {found[:5]}")
        status, report = verify(self.server)
        if status != 0:
            raise HarnessFailure(
                f"replicore verify is not clean: corrupt {report['corrupt'][:3]},"
                f" missing {report['missing'][:3]}, damaged {report['damaged_images'][:3]}"
            )

    def _export_equal(self, agent: str, volume: str, epoch: int, digest: str) -> None:
        out = self.work / "export.img"
        result = self.server.cli(
            "export", "--agent", agent, "--volume", volume, "--epoch", str(epoch), "-o", str(out)
        )
        if result.status != 0:
            raise HarnessFailure(f"export of {agent} {volume}:{epoch} failed: {result.stderr}")
        if sha256(out.read_bytes()) != digest:
            raise HarnessFailure(f"export of {agent} {volume}:{epoch} differs from what was pushed")
        out.unlink()

    def _epochs(self, agent: str, volume: str) -> list[int]:
        return [
            int(r[0])
            for r in query(
                self.server,
                "SELECT v.epoch_number FROM volume_images v JOIN agents a ON a.id = v.agent_pk"
                " WHERE a.agent_id = ? AND v.driver_volume_id = ? ORDER BY 1",
                (agent, volume),
            )
        ]

    def _settle(self, agent: str, volume: str, digest: str) -> None:
        """Export every epoch of the volume not seen before: each must be `digest`."""
        for epoch in self._epochs(agent, volume):
            if (agent, volume, epoch) not in self.expected:
                self._export_equal(agent, volume, epoch, digest)
                self.expected[(agent, volume, epoch)] = digest

    def _check_sample(self) -> None:
        """Two earlier images, picked at random, still export exactly."""
        known = sorted(self.expected.items())
        for (agent, volume, epoch), digest in self.rng.sample(known, min(2, len(known))):
            self._export_equal(agent, volume, epoch, digest)

    def _push_ok(self, agent: str, image: Path) -> dict[str, Any]:
        run = push(self.source, self.server, agent, {"vol": image})
        if run.status != 0:
            raise HarnessFailure(f"push of {agent} failed: {run.stderr.strip()}")
        result: dict[str, Any] = run.result
        self._settle(agent, "vol", sha256(image.read_bytes()))
        return result

    def _spare(self) -> str:
        if not self.spare_agents:
            raise HarnessFailure("no spare agent left: set up more")
        return self.spare_agents.pop(0)

    def _kill_during(
        self,
        proc: subprocess.Popen[bytes],
        kind: str,
        working: Callable[[], bool],
        *,
        early: float = 0.0,
        done: Callable[[], bool] | None = None,
    ) -> tuple[float, bool]:
        """Kill the subprocess (and the server) at a random moment of its work: with
        probability `early` before it shows progress (`working()`), else at a random moment
        of the expected time from progress to the work being done (`done()`, else the
        process ending), learned from earlier runs. Returns (seconds from the start to the
        kill, whether the process had finished first)."""
        started = time.monotonic()
        finished = False
        if self.rng.random() < early and f"{kind}_start" in self.durations:
            try:
                proc.wait(self.rng.uniform(0.0, self.durations[f"{kind}_start"]))
                finished = True
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        else:
            while not working() and proc.poll() is None:
                time.sleep(0.01)
            seen = time.monotonic()
            self.durations[f"{kind}_start"] = seen - started
            deadline = seen + self.rng.uniform(0.0, self.durations.get(kind, 0.5))
            while time.monotonic() < deadline and proc.poll() is None:
                if done is not None and done():
                    self.durations[kind] = max(0.02, time.monotonic() - seen)
                    done = None
                time.sleep(0.01)
            finished = proc.poll() is not None
            if finished:
                if done is None or done():
                    self.durations[kind] = min(
                        self.durations.get(kind, 0.5), max(0.02, time.monotonic() - seen)
                    )
            else:
                proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic() - started
        self._kill_server()
        proc.communicate(timeout=120)
        return killed_at, finished

    def _count(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        try:
            return int(query(self.server, sql, args)[0][0])
        except Exception:  # the database is busy or being checkpointed: no news
            return -1

    # ------------------------------------------------------------------ kill points

    def _point_push(self, point: KillPoint) -> None:
        image = self.work / "web01.img"
        percent = self.rng.choice([2, 10, 40])
        change_blocks(image, self.rng, percent)
        digest = sha256(image.read_bytes())
        before = set(self._epochs("web01", "vol"))
        proc = push_process(self.source, self.server, "web01", {"vol": image})
        point.delay, finished = self._kill_during(
            proc,
            "push",
            self._web01_session_open,
            early=0.15,
            done=lambda: len(self._epochs("web01", "vol")) > len(before),
        )
        self._restart()
        committed = set(self._epochs("web01", "vol")) - before
        sessions = query(
            self.server,
            "SELECT s.block_count, (SELECT count(*) FROM session_blocks b WHERE b.session_pk"
            " = s.id AND EXISTS (SELECT 1 FROM records r WHERE r.repository_id ="
            " s.repository_id AND r.key = b.key)) FROM sessions s JOIN agents a"
            " ON a.id = s.agent_pk WHERE a.agent_id = 'web01'",
        )
        if committed:
            point.phase = "push committed" + (" (before the kill)" if finished else "")
        elif sessions:
            total, durable = sessions[0]
            point.phase = f"session open, {durable} of {total} blocks durable ({percent}% new)"
        else:
            point.phase = "no session opened yet"
        self._check_database()
        self._push_ok("web01", image)
        if self._epochs("web01", "vol")[-1] in before:
            raise HarnessFailure("the push run again committed no new epoch")
        if self.expected[("web01", "vol", self._epochs("web01", "vol")[-1])] != digest:
            raise HarnessFailure("the latest epoch is not the image pushed")

    def _web01_session_open(self) -> bool:
        return (
            self._count(
                "SELECT count(*) FROM sessions s JOIN agents a ON a.id = s.agent_pk"
                " WHERE a.agent_id = 'web01'"
            )
            > 0
        )

    def _commit_bulk(self, image: bytes, *, background: bool) -> tuple[str, int, Any]:
        """Open, negotiate and send the next epoch of bulk; end it (in the background when
        asked). Returns (session id, epoch, the end answer)."""
        blocks = split(image, COMMIT_BLOCK)
        entries = key_entries(blocks)
        epoch = self.bulk_epoch + 1
        previous = self.bulk_epoch or None
        with self.server.client(self.source, timeout=120) as client:
            bulk = DataPathClient(client, "bulk")
            sid = bulk.open_ok("vol", epoch, len(image), COMMIT_BLOCK, previous)["sessionId"]
            bulk.send_records(sid, blocks, bulk.missing(sid, entries))
            started = time.monotonic()
            answer = bulk.end(sid, True, len(blocks), keys_checksum(entries), background=background)
            if not background:
                self.durations["commit"] = time.monotonic() - started
        if not background:
            if answer.status_code != 200:
                raise HarnessFailure(f"commit of bulk {epoch}: {answer.text}")
            self.bulk_epoch = epoch
            self._settle("bulk", "vol", sha256(image))
        return sid, epoch, answer

    def _point_commit(self, point: KillPoint) -> None:
        data = bytearray(self.bulk)
        for index in self.rng.sample(range(len(data) // COMMIT_BLOCK), 64):
            data[index * COMMIT_BLOCK : (index + 1) * COMMIT_BLOCK] = self.rng.randbytes(
                COMMIT_BLOCK
            )
        image = bytes(data)
        sid, epoch, answer = self._commit_bulk(image, background=True)
        if answer.status_code != 202:
            raise HarnessFailure(f"background commit not started: {answer.text}")
        point.delay = self.rng.uniform(0.0, self.durations["commit"])
        time.sleep(point.delay)
        self._kill_server()
        self._restart()
        if epoch in self._epochs("bulk", "vol"):
            point.phase = "commit done"
            if query(self.server, "SELECT count(*) FROM sessions WHERE session_id = ?", (sid,)) != [
                (0,)
            ]:
                raise HarnessFailure("the session of a committed image is still open")
        else:
            point.phase = "commit rolled back, session open"
            self._check_database()
            blocks = split(image, COMMIT_BLOCK)
            with self.server.client(self.source, timeout=120) as client:
                done = DataPathClient(client, "bulk").end(
                    sid, True, len(blocks), keys_checksum(key_entries(blocks))
                )
            if done.status_code != 200:
                raise HarnessFailure(f"committing again after the restart: {done.text}")
        self._check_database()
        self.bulk, self.bulk_epoch = image, epoch
        self._settle("bulk", "vol", sha256(image))

    def _point_delete(self, point: KillPoint) -> None:
        agent = self._spare()
        image = self.work / f"{agent}.img"
        image.write_bytes(disk_image(self.rng, 64))
        self._push_ok(agent, image)
        outcome: list[Any] = []

        def delete() -> None:
            try:
                with self.server.client(self.source) as client:
                    outcome.append(client.delete(f"slave/agents/{agent}").status_code)
            except httpx.HTTPError as error:
                outcome.append(error)

        started = time.monotonic()
        worker = threading.Thread(target=delete, daemon=True)
        worker.start()
        point.delay = self.rng.uniform(0.0, self.durations.get("delete", 0.05))
        time.sleep(point.delay)
        self._kill_server()
        worker.join(60)
        if outcome and outcome[0] == 200:
            self.durations["delete"] = max(0.01, time.monotonic() - started)
        self._restart()
        live = query(self.server, "SELECT count(*) FROM agents WHERE agent_id = ?", (agent,))
        binned = query(self.server, "SELECT count(*) FROM bin_entries WHERE agent_id = ?", (agent,))
        if live == [(1,)] and binned == [(0,)]:
            point.phase = "agent still there"
            self._check_database()
            self._export_equal(agent, "vol", 1, self.expected[(agent, "vol", 1)])
            with self.server.client(self.source) as client:
                if client.delete(f"slave/agents/{agent}").status_code != 200:
                    raise HarnessFailure("deleting the agent again failed")
        elif live == [(0,)] and binned == [(1,)]:
            point.phase = "agent in the recycle bin"
        else:
            raise HarnessFailure(f"agent {agent}: {live[0][0]} live rows, {binned[0][0]} in bin")
        self._check_database()
        for key in [k for k in self.expected if k[0] == agent]:
            del self.expected[key]

    def _point_gc(self, point: KillPoint) -> None:
        if not self.garbage_agents:
            raise HarnessFailure("no garbage agent left: set up more")
        agent = self.garbage_agents.pop(0)
        with self.server.client(self.source) as client:
            if client.delete(f"slave/agents/{agent}").status_code != 200:
                raise HarnessFailure("deleting the agent failed")
        for key in [k for k in self.expected if k[0] == agent]:
            del self.expected[key]
        purged = self.server.cli("bin", "purge", "--all", "--no-gc")
        if purged.status != 0:
            raise HarnessFailure(f"bin purge: {purged.stderr}")
        # Garbage is collected once older than the session timeout.
        time.sleep(max(0.0, self.garbage_pushed_at + self.session_timeout() + 0.2 - time.time()))
        before = query(self.server, "SELECT count(*) FROM records")[0][0]
        command = [sys.executable, "-m", "replicore", "gc", "--json"]
        proc = subprocess.Popen(
            [*command, "--config", str(self.server.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "REPLICORE_CONFIG"},
        )
        point.delay, finished = self._kill_during(
            proc, "gc", lambda: 0 <= self._count("SELECT count(*) FROM records") < before, early=0.2
        )
        self._restart()
        after = query(self.server, "SELECT count(*) FROM records")[0][0]
        point.phase = f"gc had deleted {before - after} of {before} records" + (
            " (finished first)" if finished else ""
        )
        self._check_database()
        collected = self.server.cli("gc")
        if collected.status != 0:
            raise HarnessFailure(f"gc after the restart: {collected.stderr}")
        self._check_database()

    def session_timeout(self) -> float:
        from replicore import config

        return config.load(self.server.config_path).replication.session_timeout

    def _point_seed(self, point: KillPoint) -> None:
        from seed_drive_helpers import create_drive

        agent = self._spare()
        image = self.work / f"{agent}.img"
        image.write_bytes(disk_image(self.rng, 128))
        drive = self.work / f"{agent}.drive"
        created = create_drive(
            self.source, agent, {"vol": image}, drive, "--target", self.server.url
        )
        before = query(self.server, "SELECT count(*) FROM records")[0][0]
        drives = query(self.server, "SELECT count(*) FROM seed_drives")[0][0]
        command = [sys.executable, "-m", "replicore", "seed-drive", "consume", str(drive)]
        proc = subprocess.Popen(
            [*command, "--json", "--config", str(self.server.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "REPLICORE_CONFIG"},
        )
        point.delay, finished = self._kill_during(
            proc,
            "seed",
            lambda: self._count("SELECT count(*) FROM records") > before,
            early=0.3,
            done=lambda: self._count("SELECT count(*) FROM seed_drives") > drives,
        )
        self._restart()
        consumed = query(
            self.server,
            "SELECT count(*) FROM seed_drives WHERE drive_id = ?",
            (created["driveId"],),
        )[0][0]
        images = self._epochs(agent, "vol")
        if consumed and images:
            point.phase = "drive consumed" + (" (before the kill)" if finished else "")
        elif not consumed and not images:
            point.phase = "drive not consumed, no image"
        else:
            raise HarnessFailure(f"drive consumed={consumed} but images {images}: half an import")
        self._check_database()
        again = self.server.cli("seed-drive", "consume", str(drive), "--json")
        if again.status != 0:
            raise HarnessFailure(f"consuming again: {again.stderr}")
        self._settle(agent, "vol", sha256(image.read_bytes()))
        if not self._epochs(agent, "vol"):
            raise HarnessFailure("the drive brought no image")
        # A push after the drive sends nothing: the drive's epoch is its base.
        result = self._push_ok(agent, image)
        if result["records_sent"] != 0:
            raise HarnessFailure(f"push after the seed drive sent {result['records_sent']}")
        with contextlib.suppress(FileNotFoundError):
            drive.unlink()


def plan_kinds(rng: random.Random, count: int) -> list[str]:
    """`count` kinds: every kind at least once, the rest weighted to pushes."""
    available = list(KINDS)
    weights = {"push": 5, "commit": 3, "delete": 2, "gc": 2, "seed": 2}
    kinds = list(available)
    while len(kinds) < count:
        kinds.append(rng.choices(available, [weights[k] for k in available])[0])
    rng.shuffle(kinds)
    return kinds[:count]


def to_json(harness: Harness) -> str:
    return json.dumps(harness.summary(), indent=2)
