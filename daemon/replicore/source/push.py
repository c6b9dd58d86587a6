"""`replicore push`: replicate volume images to a paired target as one recovery point.

For each volume the push opens a session (`slave/sessions/new`), reads the whole image once,
hashing its blocks (BLAKE3), sends the key list in batches (`records/keys`), sends the records
the target lacks compressed (`records/rawdata`, over several connections at once), and
commits (`DELETE ...?commit=true` with the block count and the key-list checksum).  All
volumes of a run share one job, recovery point id and timestamp; each gets the next epoch
after the last one the target committed.

The stages run at once, in threads, with bounded queues between them so that memory stays
flat whatever the image size:

    hash pass (reads sequentially, hashes) -> key batches -> 2 negotiators
    negotiators -> lists of missing blocks -> N senders (re-read those blocks, compress, POST)

blake3, zstandard, OpenSSL and file reads release the GIL, so the threads use both cores.
The image is never held in memory: senders read the missing blocks again (the page cache
serves them).  Progress and the run in progress are remembered in `state.AgentState`, so an
interrupted push run again resumes its sessions and sends only what the target still lacks.
Every failure reaches the caller as a `PushError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import gc
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from .. import protocol
from . import identity
from .hashpass import Cancelled, HashPass
from .identity import IdentityError
from .job_mirror import JobMirror
from .progress import Counters, Display
from .ratelimit import TokenBucket
from .reader import Image, ImageError
from .state import AgentState, StateError
from .transport import Answer, TargetClient, TransportError

#: Key batches negotiated at once (each on a connection of its own): the next batch's round
#: trip and the target's work on it overlap the answer to the previous one.
NEGOTIATORS = 2
#: Raw bytes of records in one rawdata request (its body is at most this plus headers).
RECORDS_BATCH_BYTES = 4 * 1024 * 1024
#: With --max-rate, a rawdata request carries about this many seconds of sending, so that an
#: interrupted push loses little.
RATED_BATCH_SECONDS = 0.5
#: Attempts to open a session when the target reports a later committed epoch.
SESSION_ATTEMPTS = 4
POLL = 0.1


class PushError(RuntimeError):
    """A push failed; the message is one line for the user."""


class OptionError(PushError):
    """The options of a push are unusable (nothing was sent)."""


@dataclass(frozen=True)
class VolumeSpec:
    volume_id: str
    path: str


@dataclass
class PushOptions:
    agent_id: str
    volumes: list[VolumeSpec]
    target_url: str | None = None
    streams: int = 4
    block_size: int = protocol.DEFAULT_BLOCK_SIZE
    max_rate: int | None = None
    directory: Path | None = None
    #: The first volume's hash pass, already started by the caller on an image of the first
    #: volume's path with this block size; the push owns it from then on.
    first_pass: HashPass | None = None
    #: Where the progress line goes (only drawn when it is a terminal).
    progress: TextIO | None = None


@dataclass
class _VolumeStats:
    driver_volume_id: str
    path: str
    size: int
    block_size: int
    epoch: int = 0
    previous_epoch: int | None = None
    session_id: str | None = None
    resumed: bool = False
    already_committed: bool = False
    blocks: int = 0
    transferred_before: int = 0
    bytes_read: int = 0
    missing_blocks: int = 0
    missing_bytes: int = 0
    records_sent: int = 0
    raw_bytes_sent: int = 0
    bytes_sent: int = 0
    records_already_present: int = 0
    passes: int = 0
    volume_image: Any = None
    recovery_point_complete: bool | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: int) -> None:
        with self.lock:
            for name, value in amounts.items():
                setattr(self, name, getattr(self, name) + value)

    def report(self) -> dict[str, Any]:
        return {
            "driver_volume_id": self.driver_volume_id,
            "path": self.path,
            "epoch": self.epoch,
            "previous_epoch": self.previous_epoch,
            "session_id": self.session_id,
            "resumed": self.resumed,
            "already_committed": self.already_committed,
            "size": self.size,
            "block_size": self.block_size,
            "blocks": self.blocks,
            "transferred_before": self.transferred_before,
            "bytes_read": self.bytes_read,
            "missing_blocks": self.missing_blocks,
            "records_sent": self.records_sent,
            "raw_bytes_sent": self.raw_bytes_sent,
            "bytes_sent": self.bytes_sent,
            "records_already_present": self.records_already_present,
            "dedup_bytes": max(0, self.bytes_read - self.raw_bytes_sent),
            "dedup_ratio": round(1 - self.raw_bytes_sent / self.bytes_read, 4)
            if self.bytes_read
            else None,
            "volume_image": self.volume_image,
            "recovery_point_complete": self.recovery_point_complete,
        }


def _refusal(what: str, answer: Answer) -> PushError:
    """A PushError for an unexpected answer, worded after its status."""
    message = answer.error_message()
    status = answer.status
    if status == 401:
        return PushError(
            f"{what}: the target does not accept this source ({message}); "
            "pair with `replicore source pair` first"
        )
    if status == 403:
        return PushError(f"{what}: refused by the target: {message}")
    if status == 404:
        return PushError(f"{what}: not found on the target: {message}")
    if status == 507:
        return PushError(f"{what}: the target is out of storage: {message}")
    return PushError(f"{what}: the target answered HTTP {status}: {message}")


def _count_bits(bitmap: bytes) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


class _Abort(Exception):
    """Another stage failed; this one stops quietly."""


class _Pipeline:
    """One pass over one volume: hash, negotiate, send.  Returns the commit figures."""

    def __init__(self, push: _VolumePush, hash_pass: HashPass) -> None:
        self.push = push
        self.image = push.image
        self.client = push.run.client
        self.counters = push.run.counters
        self.stats = push.stats
        self.streams = push.run.options.streams
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.hash_pass = hash_pass
        hash_pass.report_reads(self._read)
        self.send_queue: queue.Queue[list[protocol.KeyEntry] | None] = queue.Queue(
            maxsize=2 * self.streams
        )
        # Keys of the records queued or being sent: a key the target lists again while its
        # record is on the way (it repeats in the image) is not sent twice.  Bounded by the
        # send queue, not by the image.
        self.in_flight: set[bytes] = set()
        self.in_flight_lock = threading.Lock()
        self.negotiating = NEGOTIATORS
        self.path = ""
        self.batch_bytes = push.run.records_batch_bytes

    # -- plumbing ----------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        if not isinstance(error, (_Abort, Cancelled)):
            self.errors.append(error)
        self.failed.set()
        self.hash_pass.cancel()

    def _read(self, nbytes: int) -> None:
        self.counters.add(bytes_read=nbytes)
        self.stats.add(bytes_read=nbytes)

    def _put(self, q: queue.Queue[Any], item: Any) -> None:
        while True:
            if self.failed.is_set():
                raise _Abort
            try:
                q.put(item, timeout=POLL)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue[Any]) -> Any:
        while True:
            if self.failed.is_set():
                raise _Abort
            try:
                return q.get(timeout=POLL)
            except queue.Empty:
                continue

    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as error:
                self._fail(error)

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread

    # -- stages ------------------------------------------------------------------------

    def _negotiate(self, batch: list[protocol.KeyEntry]) -> None:
        answer = self.client.request(
            "POST", f"{self.path}/records/keys", content=protocol.encode_keys(batch)
        )
        if answer.status != 200:
            raise _refusal(f"volume {self.stats.driver_volume_id}: sending keys", answer)
        try:
            missing = protocol.decode_missing(answer.body)
        except protocol.ProtocolError as exc:
            raise PushError(f"the target's answer to a key batch is malformed: {exc}") from None
        # The answer is a subsequence of the batch, in its order: walk both.
        wanted: list[protocol.KeyEntry] = []
        pos = 0
        for index in missing:
            while pos < len(batch) and batch[pos].index != index:
                pos += 1
            if pos == len(batch):
                raise PushError(
                    f"the target answered block {index}, which was not asked or not in order"
                )
            entry = batch[pos]
            pos += 1
            with self.in_flight_lock:
                if entry.key in self.in_flight:  # an identical block is on its way
                    continue
                self.in_flight.add(entry.key)
            wanted.append(entry)
        missing_bytes = sum(e.length for e in wanted)
        self.stats.add(missing_blocks=len(missing), missing_bytes=missing_bytes)
        self.counters.add(missing_bytes=missing_bytes)
        item: list[protocol.KeyEntry] = []
        item_bytes = 0
        for entry in wanted:
            if item and (
                item_bytes + entry.length > self.batch_bytes
                or len(item) >= protocol.MAX_RECORDS_PER_BATCH
            ):
                self._put(self.send_queue, item)
                item, item_bytes = [], 0
            item.append(entry)
            item_bytes += entry.length
        if item:
            self._put(self.send_queue, item)

    def _negotiator(self) -> None:
        while (batch := self.hash_pass.take()) is not None:
            self._negotiate(batch)
        with self.in_flight_lock:
            self.negotiating -= 1
            last = self.negotiating == 0
        if last:
            for _ in range(self.streams):
                self._put(self.send_queue, None)

    def _sender(self) -> None:
        path = f"{self.path}/records/rawdata"
        volume = self.stats.driver_volume_id
        buffer: bytearray | None = None
        while True:
            item = self._get(self.send_queue)
            if item is None:
                return
            buffer, views = self.image.read_blocks([e.index for e in item], buffer)
            # The body goes out as its pieces (no joined copy): raw blocks are views of
            # `buffer`, which is not reused before the answer.
            parts: list[bytes | memoryview] = [protocol.encode_records_header(len(item))]
            payload_bytes = raw_bytes = 0
            for entry, view in zip(item, views, strict=True):
                codec, payload = protocol.compress_block(view)
                parts.append(
                    protocol.encode_record_header(
                        entry.index, entry.key, entry.length, codec, len(payload)
                    )
                )
                parts.append(payload)
                payload_bytes += len(payload)
                raw_bytes += entry.length
            if self.failed.is_set():
                raise _Abort
            answer = self.client.request("POST", path, content=parts)
            del parts, views
            if answer.status == 422:
                data = answer.json() or {}
                block = data.get("blockIndex") if isinstance(data, dict) else None
                raise PushError(
                    f"volume {volume}: the target refused block {block}: "
                    f"{answer.error_message()} (was the image modified during the push?)"
                )
            if answer.status != 200:
                raise _refusal(f"volume {volume}: sending records", answer)
            data = answer.json() or {}
            present = int(data.get("alreadyPresent", 0)) if isinstance(data, dict) else 0
            self.stats.add(
                records_sent=len(item),
                raw_bytes_sent=raw_bytes,
                bytes_sent=payload_bytes,
                records_already_present=present,
            )
            self.counters.add(
                records_sent=len(item), raw_bytes_sent=raw_bytes, bytes_sent=payload_bytes
            )
            # Stored now: the target no longer lists these keys as missing.
            with self.in_flight_lock:
                self.in_flight.difference_update(entry.key for entry in item)

    # -- the pass ----------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the hash pass (the session turned out to be committed already, or opening
        it failed)."""
        self.failed.set()
        self.hash_pass.cancel()

    def run(self, session_path: str) -> tuple[int, str]:
        """Negotiate and send on the session at `session_path`; the commit's figures."""
        self.path = session_path
        threads = [self._thread(self._negotiator, f"push-keys-{n}") for n in range(NEGOTIATORS)]
        threads += [self._thread(self._sender, f"push-sender-{n}") for n in range(self.streams)]
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(POLL)
                    if self.failed.is_set():
                        raise _Abort
        except BaseException as error:
            self._fail(error)
        if self.errors:
            raise self.errors[0]
        if self.failed.is_set():
            raise PushError("push stopped")
        return self.hash_pass.key_count, self.hash_pass.checksum.hexdigest()


class _VolumePush:
    """Push of one volume within a run: session, passes, commit."""

    def __init__(
        self, run: _Run, spec: VolumeSpec, image: Image, started_pass: HashPass | None
    ) -> None:
        self.run = run
        self.spec = spec
        self.image = image
        #: The first pass over this image, if the command started it already.
        self.started_pass = started_pass
        self.entry = run.state.run["volumes"][spec.volume_id]  # type: ignore[index]
        self.stats = _VolumeStats(spec.volume_id, spec.path, image.size, image.block_size)
        self.session_path = ""

    def _open_session(self) -> dict[str, Any] | None:
        """The session for this volume's epoch, or None if the target already committed it."""
        run, entry, vid = self.run, self.entry, self.spec.volume_id
        for _ in range(SESSION_ATTEMPTS):
            body = {
                "agentId": run.options.agent_id,
                "jobId": run.job_id,
                "driverVolumeId": vid,
                "epochNumber": entry["epoch"],
                "previousEpochNumber": entry["previousEpoch"],
                "blockSize": self.image.block_size,
                "size": self.image.size,
                "recoveryPointId": run.recovery_point_id,
                "recoveryPointTimestamp": run.recovery_point_timestamp,
                "volumeCount": len(run.options.volumes),
            }
            answer = run.client.request("POST", "slave/sessions/new", json_body=body)
            if answer.status == 200:
                data = answer.json()
                if not isinstance(data, dict) or not isinstance(data.get("sessionId"), str):
                    raise PushError("the target's answer to sessions/new has no sessionId")
                run.state.set_session(vid, data["sessionId"])
                return data
            data = answer.json()
            committed = data.get("committedEpochNumber") if isinstance(data, dict) else None
            if answer.status != 409 or not isinstance(committed, int):
                raise _refusal(
                    f"volume {vid}: opening a session for epoch {entry['epoch']}", answer
                )
            if committed == entry["epoch"] and entry.get("sessionId"):
                return None  # our own commit went through before the run was interrupted
            # The target is ahead of what this source remembers: chain onto its epoch.
            run.state.set_epoch(vid, committed + 1, committed)
        raise PushError(f"volume {vid}: the target keeps reporting newer committed epochs")

    def _commit(self, session_id: str, count: int, checksum: str) -> Answer:
        return self.run.client.request(
            "DELETE",
            f"{self.session_path}?commit=true",
            json_body={"blockCount": count, "keysChecksum": checksum},
        )

    def push(self) -> dict[str, Any]:
        run, vid, stats = self.run, self.spec.volume_id, self.stats
        run.counters.volume = vid
        stats.blocks = self.image.block_count
        if self.entry.get("committed"):
            stats.already_committed = True
            stats.epoch, stats.previous_epoch = self.entry["epoch"], self.entry["previousEpoch"]
            stats.session_id = self.entry.get("sessionId")
            return stats.report()
        while True:
            # The pass is read and hashed while the session opens (it needs none).
            hash_pass = self.started_pass or HashPass.started(self.image)
            self.started_pass = None
            pipeline = _Pipeline(self, hash_pass)
            try:
                session = self._open_session()
            except BaseException:
                pipeline.cancel()
                raise
            stats.epoch, stats.previous_epoch = self.entry["epoch"], self.entry["previousEpoch"]
            if session is None:
                pipeline.cancel()
                run.state.volume_committed(vid, self.entry["epoch"])
                stats.already_committed = True
                stats.session_id = self.entry.get("sessionId")
                return stats.report()
            session_id = session["sessionId"]
            stats.session_id = session_id
            stats.resumed = stats.resumed or bool(session.get("resumed"))
            self.session_path = (
                f"slave/{quote(run.options.agent_id, safe='')}/{quote(run.job_id, safe='')}/"
                f"{quote(session_id, safe='')}"
            )
            if session.get("resumed") or session.get("transferredBlockCount"):
                answer = run.client.request(
                    "GET", f"slave/sessions/{quote(session_id, safe='')}/transferredblocks"
                )
                if answer.status != 200:
                    pipeline.cancel()
                    raise _refusal(f"volume {vid}: reading the transferred blocks", answer)
                stats.transferred_before = _count_bits(answer.body)
            stats.passes += 1
            count, checksum = pipeline.run(self.session_path)
            answer = self._commit(session_id, count, checksum)
            if answer.status == 200:
                data = answer.json() or {}
                run.state.volume_committed(vid, self.entry["epoch"])
                stats.volume_image = data.get("volumeImage")
                stats.recovery_point_complete = data.get("recoveryPointComplete")
                return stats.report()
            # 422: blocks missing (re-negotiate); 404: the session is gone (committed by an
            # attempt whose answer was lost, or expired): sessions/new tells which.  Once.
            if answer.status in (404, 422) and stats.passes < 2:
                continue
            raise _refusal(f"volume {vid}: committing epoch {self.entry['epoch']}", answer)


@dataclass
class _Run:
    options: PushOptions
    client: TargetClient
    state: AgentState
    counters: Counters
    records_batch_bytes: int

    @property
    def job_id(self) -> str:
        return self.state.run["jobId"]  # type: ignore[index]

    @property
    def recovery_point_id(self) -> str:
        return self.state.run["recoveryPointId"]  # type: ignore[index]

    @property
    def recovery_point_timestamp(self) -> str:
        return self.state.run["recoveryPointTimestamp"]  # type: ignore[index]


def _target_certificate(target: dict[str, Any]) -> str:
    for name in ("certificate", "certificatePem", "pem", "serverCertificate"):
        value = target.get(name)
        if isinstance(value, str) and "BEGIN CERTIFICATE" in value:
            return value
    raise PushError(f"the pairing record of {target.get('url')} has no pinned certificate")


def discard_session(client: TargetClient, agent_id: str, session: dict[str, Any]) -> None:
    """Best effort: drop an abandoned session of an earlier run (it would expire anyway)."""
    path = "slave/{}/{}/{}?commit=false".format(
        quote(agent_id, safe=""),
        quote(session["jobId"], safe=""),
        quote(session["sessionId"], safe=""),
    )
    with contextlib.suppress(TransportError):
        client.request("DELETE", path, retry=False)


def check_options(options: PushOptions) -> None:
    if not options.volumes:
        raise OptionError("name at least one --volume DRIVER_VOLUME_ID=PATH")
    ids = [v.volume_id for v in options.volumes]
    if len(set(ids)) != len(ids):
        raise OptionError("a driver volume id is named twice")
    try:
        protocol.check_block_size(options.block_size)
    except protocol.ProtocolError as exc:
        raise OptionError(f"--block-size: {exc}") from None
    if not 1 <= options.streams <= 64:
        raise OptionError("--streams must be within 1..64")
    if options.max_rate is not None and options.max_rate < 1024:
        raise OptionError("--max-rate must be at least 1024 bytes per second")


def push(options: PushOptions) -> dict[str, Any]:
    """Push the volumes as one recovery point; returns the figures of the run."""
    # The hash pass makes a tuple per block and keeps batches of them alive: the cyclic
    # garbage collector would rescan them again and again (measured: 6% of the client's
    # CPU on a no-change push) for no cycle to find.
    collecting = gc.isenabled()
    gc.disable()
    try:
        check_options(options)
        return _push(options)
    finally:
        if options.first_pass is not None:
            options.first_pass.cancel()
            options.first_pass.image.close()
        if collecting:
            gc.enable()


def _push(options: PushOptions) -> dict[str, Any]:
    # The run's time includes the read of the first image since the command started it.
    started = time.monotonic() if options.first_pass is None else options.first_pass.started_at
    try:
        source = identity.load(options.directory)
        target = source.find_target(options.target_url)
    except IdentityError as exc:
        raise PushError(str(exc)) from None
    pem = _target_certificate(target)
    target_core = str(target.get("coreId") or "")
    if not target_core:
        raise PushError(f"the pairing record of {target.get('url')} has no core id")
    bucket = TokenBucket(options.max_rate) if options.max_rate else None
    batch_bytes = RECORDS_BATCH_BYTES
    if options.max_rate:
        batch_bytes = min(batch_bytes, max(1, int(options.max_rate * RATED_BATCH_SECONDS)))
    images = [] if options.first_pass is None else [options.first_pass.image]
    display: Display | None = None
    try:
        for spec in options.volumes[len(images) :]:
            images.append(Image(spec.path, options.block_size))
        counters = Counters(sum(image.size for image in images))
        shapes = {
            spec.volume_id: (image.size, image.block_size)
            for spec, image in zip(options.volumes, images, strict=True)
        }
        with (
            TargetClient(
                target["url"],
                pem,
                source,
                connections=options.streams + NEGOTIATORS + 1,
                bucket=bucket,
            ) as client,
            AgentState.locked(source, target_core, options.agent_id) as state,
        ):
            if options.progress is not None and options.progress.isatty():
                display = Display(counters, client.counter, options.progress)
                display.start()
            _, resumed_run, abandoned = state.start_run(shapes)
            for session in abandoned:
                discard_session(client, options.agent_id, session)
            run = _Run(options, client, state, counters, batch_bytes)
            volumes = run.state.run["volumes"]  # type: ignore[index]
            job = JobMirror(
                client,
                run.job_id,
                options.agent_id,
                [
                    f"{spec.volume_id}:{volumes[spec.volume_id]['epoch']}"
                    for spec in options.volumes
                ],
                counters,
                options.streams,
            )
            job.start()
            try:
                passes = [options.first_pass] + [None] * (len(images) - 1)
                reports = [
                    _VolumePush(run, spec, image, started).push()
                    for spec, image, started in zip(options.volumes, images, passes, strict=True)
                ]
            except BaseException as error:
                job.finish(error)
                raise
            job.finish(None)
            job_id, rp_id = run.job_id, run.recovery_point_id
            rp_time = run.recovery_point_timestamp
            state.finish_run()
            wire = client.counter
    except (ImageError, StateError, TransportError) as exc:
        raise PushError(str(exc)) from None
    except OSError as exc:
        raise PushError(f"{exc.filename or 'I/O'}: {exc.strerror or exc}") from None
    finally:
        if display is not None:
            display.stop()
        if options.first_pass is not None:
            options.first_pass.cancel()  # before its image is closed under it
        for image in images:
            image.close()
    return run_summary(
        target, options.agent_id, (job_id, rp_id, rp_time), resumed_run, reports, wire, started
    )


#: Per-volume figures that a run's summary adds up.
SUMMED = ("bytes_read", "records_sent", "bytes_sent", "raw_bytes_sent", "dedup_bytes")


def run_summary(
    target: dict[str, Any],
    agent_id: str,
    point: tuple[str, str, str],
    resumed_run: bool,
    reports: list[dict[str, Any]],
    wire: Any,
    started: float,
    summed: tuple[str, ...] = SUMMED,
) -> dict[str, Any]:
    """The `--json` line of a run: its job and recovery point (`point`: job id, recovery
    point id, its timestamp), the volumes' figures added up, the wire counter, the time."""
    job_id, point_id, point_time = point
    completes = [r["recovery_point_complete"] for r in reports if not r["already_committed"]]
    return {
        "target": target["url"],
        "target_core_id": str(target.get("coreId") or ""),
        "agent_id": agent_id,
        "job_id": job_id,
        "recovery_point_id": point_id,
        "recovery_point_timestamp": point_time,
        "resumed_run": resumed_run,
        "recovery_point_complete": completes[-1] if completes else None,
        **{name: sum(r[name] for r in reports) for name in summed},
        "wire_bytes": wire.total,
        "wire_bytes_sent": wire.sent,
        "wire_bytes_received": wire.received,
        "connections": wire.connections,
        "seconds": round(time.monotonic() - started, 3),
        "volumes": reports,
    }
