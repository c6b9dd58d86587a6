"""`replicore push --direct`: replicate volume images by direct (O3E) transfer, without hashing.

For each volume: open a direct session (`slave/directreplicationsessions/new`), set the
snapshot file (`directreplication/slave/{agentId}/{jobId}/{sessionId}`), read the image once to
find the blocks in use (any block that is not all zeros), send that bitmap (`.../bitmap`), then
send the used blocks in ascending order, raw, in bodies of at most the size the target names
in `repoconnectiondescription`, each saying where it starts (`X-O3E-Block-Index`). The target
hashes, deduplicates and commits when the last block is in. There is no key negotiation: every
used block travels, so this suits sources that cannot hash, or first transfers.

Runs, epochs, job and recovery point ids are those of `replicore push` (`state.AgentState`),
so a direct push and a normal push chain onto each other, and an interrupted direct push run
again resumes: the target names the next block it expects. The result has the shape of
`push.push`'s, so `replicore push` prints it the same way.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import identity
from .identity import IdentityError
from .push import (
    SUMMED,
    OptionError,
    PushError,
    PushOptions,
    VolumeSpec,
    check_options,
    discard_session,
    run_summary,
)
from .ratelimit import TokenBucket
from .reader import Image, ImageError
from .state import AgentState, StateError
from .transport import Answer, TargetClient, TransportError

#: Image bytes read at once while looking for used blocks.
READ_CHUNK = 8 * 1024 * 1024
#: Largest o3edata body this client sends (the target's limit may be lower).
SEND_BYTES = 4 * 1024 * 1024
SESSION_ATTEMPTS = 4

__all__ = ["OptionError", "PushError", "push_direct", "used_bitmap"]


def used_bitmap(image: Image) -> tuple[bytes, int]:
    """The image's used-block bitmap (bit i, LSB first, set when block i is not all zeros) and
    how many blocks are used."""
    bs = image.block_size
    bits = bytearray(-(-image.block_count // 8))
    zero = bytes(bs)
    chunk_blocks = max(1, READ_CHUNK // bs)
    buffer = memoryview(bytearray(chunk_blocks * bs))
    used = 0
    image.advise_sequential()
    for first in range(0, image.block_count, chunk_blocks):
        start = first * bs
        nbytes = min(chunk_blocks * bs, image.size - start)
        view = buffer[:nbytes]
        image.read_into(view, start)
        for n in range(-(-nbytes // bs)):
            block = view[n * bs : (n + 1) * bs].tobytes()  # bytes compare with memcmp
            if block != zero[: len(block)]:
                index = first + n
                bits[index >> 3] |= 1 << (index & 7)
                used += 1
    return bytes(bits), used


def _used_indices(bitmap: bytes, start: int, count: int) -> list[int]:
    return [i for i in range(start, count) if bitmap[i >> 3] >> (i & 7) & 1]


def _refusal(what: str, answer: Answer) -> PushError:
    message = answer.error_message()
    if answer.status == 401:
        return PushError(
            f"{what}: the target does not accept this source ({message}); "
            "pair with `replicore source pair` first"
        )
    if answer.status == 404:
        return PushError(f"{what}: not found on the target: {message}")
    if answer.status == 507:
        return PushError(f"{what}: the target is out of storage: {message}")
    return PushError(f"{what}: the target answered HTTP {answer.status}: {message}")


def _json(answer: Answer, what: str) -> dict[str, Any]:
    data = answer.json()
    if not isinstance(data, dict):
        raise PushError(f"{what}: the target's answer is not a JSON object")
    return data


class _DirectVolume:
    """The direct transfer of one volume within a run."""

    def __init__(self, run: _Run, spec: VolumeSpec, image: Image) -> None:
        self.run, self.spec, self.image = run, spec, image
        self.entry = run.state.run["volumes"][spec.volume_id]  # type: ignore[index]
        self.report: dict[str, Any] = {
            "driver_volume_id": spec.volume_id,
            "path": spec.path,
            "size": image.size,
            "block_size": image.block_size,
            "blocks": image.block_count,
            "already_committed": False,
            "resumed": False,
            "bytes_read": 0,
            "used_blocks": 0,
            "blocks_sent": 0,
            "records_sent": 0,
            "records_stored": 0,
            "raw_bytes_sent": 0,
            "bytes_sent": 0,
            "dedup_bytes": 0,
            "volume_image": None,
            "recovery_point_complete": None,
        }
        self.path = ""

    def _open(self) -> dict[str, Any] | None:
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
                "recoveryPointId": run.state.run["recoveryPointId"],  # type: ignore[index]
                "recoveryPointTimestamp": run.state.run["recoveryPointTimestamp"],  # type: ignore[index]
                "volumeCount": len(run.options.volumes),
            }
            answer = run.client.request(
                "POST", "slave/directreplicationsessions/new", json_body=body
            )
            if answer.status == 200:
                data = _json(answer, "directreplicationsessions/new")
                run.state.set_session(vid, str(data["sessionId"]))
                return data
            data = answer.json()
            committed = data.get("committedEpochNumber") if isinstance(data, dict) else None
            if answer.status != 409 or not isinstance(committed, int):
                raise _refusal(f"volume {vid}: opening a direct session", answer)
            if committed == entry["epoch"] and entry.get("sessionId"):
                return None  # committed by an earlier attempt whose answer was lost
            run.state.set_epoch(vid, committed + 1, committed)
        raise PushError(f"volume {vid}: the target keeps reporting newer committed epochs")

    def push(self) -> dict[str, Any]:
        run, vid, report = self.run, self.spec.volume_id, self.report
        if self.entry.get("committed"):
            report.update(already_committed=True, epoch=self.entry["epoch"])
            report["previous_epoch"] = self.entry["previousEpoch"]
            return report
        session = self._open()
        report.update(epoch=self.entry["epoch"], previous_epoch=self.entry["previousEpoch"])
        if session is None:
            run.state.volume_committed(vid, self.entry["epoch"])
            report["already_committed"] = True
            return report
        session_id = str(session["sessionId"])
        report.update(session_id=session_id, resumed=bool(session.get("resumed")))
        self.path = "/".join(
            quote(part, safe="") for part in (run.options.agent_id, run.job_id, session_id)
        )
        self._snapshot_file(session_id)
        bitmap, used = used_bitmap(self.image)
        report.update(bytes_read=self.image.size, used_blocks=used)
        status = self._bitmap(bitmap)
        if not status.get("committed"):
            status = self._send(bitmap)
        run.state.volume_committed(vid, self.entry["epoch"])
        report.update(
            volume_image=status.get("volumeImage"),
            recovery_point_complete=status.get("recoveryPointComplete"),
        )
        report["dedup_bytes"] = max(0, report["bytes_read"] - report["raw_bytes_sent"])
        return report

    def _snapshot_file(self, session_id: str) -> None:
        body = {
            "fullPath": str(Path(self.spec.path).resolve()),
            "openInfo": {
                "blockSize": self.image.block_size,
                "scid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"replicore-scid:{session_id}")),
                "size": self.image.size,
                "volumeId": self.spec.volume_id,
                "imageType": "incremental" if self.entry["previousEpoch"] is not None else "base",
                "partial": False,
            },
        }
        answer = self.run.client.request(
            "POST", f"directreplication/slave/{self.path}", json_body=body
        )
        if answer.status != 200:
            raise _refusal(f"volume {self.spec.volume_id}: setting the snapshot file", answer)

    def _bitmap(self, bitmap: bytes) -> dict[str, Any]:
        answer = self.run.client.request(
            "POST", f"directreplication/slave/{self.path}/bitmap", content=bitmap
        )
        if answer.status == 409:
            raise PushError(
                f"volume {self.spec.volume_id}: the target holds another bitmap for this"
                f" session ({answer.error_message()}); was the image modified since?"
            )
        if answer.status != 200:
            raise _refusal(f"volume {self.spec.volume_id}: sending the bitmap", answer)
        return _json(answer, "bitmap")

    def _send(self, bitmap: bytes) -> dict[str, Any]:
        vid, client = self.spec.volume_id, self.run.client
        answer = client.request("GET", f"slave/agents/{self.path}/repoconnectiondescription")
        if answer.status != 200:
            raise _refusal(f"volume {vid}: reading the repository connection", answer)
        description = _json(answer, "repoconnectiondescription")
        limit = min(SEND_BYTES, int(description.get("maxBytesPerRequest") or SEND_BYTES))
        bs = self.image.block_size
        per_request = max(1, limit // bs)
        status = description
        next_index = description.get("nextBlockIndex")
        buffer: bytearray | None = None
        while next_index is not None:
            indices = _used_indices(bitmap, int(next_index), self.image.block_count)[:per_request]
            if not indices:
                raise PushError(f"volume {vid}: the target expects block {next_index}, not used")
            buffer, views = self.image.read_blocks(indices, buffer)
            body = b"".join(views)
            del views
            answer = client.request(
                "POST",
                f"directreplication/slave/{self.path}/o3edata",
                content=body,
                headers={"X-O3E-Block-Index": str(indices[0])},
            )
            data = answer.json()
            if answer.status == 409 and isinstance(data, dict) and "nextBlockIndex" in data:
                next_index = data["nextBlockIndex"]  # resume where the target is
                continue
            if answer.status != 200:
                raise _refusal(f"volume {vid}: sending blocks from {indices[0]}", answer)
            status = _json(answer, "o3edata")
            self.report["blocks_sent"] += len(indices)
            self.report["records_sent"] += len(indices)
            self.report["records_stored"] += int(status.get("stored", 0))
            self.report["raw_bytes_sent"] += len(body)
            self.report["bytes_sent"] += len(body)
            next_index = status.get("nextBlockIndex")
        if not status.get("committed"):
            raise PushError(f"volume {vid}: the target did not commit the image")
        return status


class _Run:
    def __init__(self, options: PushOptions, client: TargetClient, state: AgentState) -> None:
        self.options, self.client, self.state = options, client, state

    @property
    def job_id(self) -> str:
        return str(self.state.run["jobId"])  # type: ignore[index]


def push_direct(options: PushOptions) -> dict[str, Any]:
    """Push the volumes as one recovery point by direct transfer; returns the figures."""
    check_options(options)
    started = time.monotonic()
    try:
        source = identity.load(options.directory)
        target = source.find_target(options.target_url)
    except IdentityError as error:
        raise PushError(str(error)) from None
    pem = target.get("certificate")
    target_core = str(target.get("coreId") or "")
    if not isinstance(pem, str) or not target_core:
        raise PushError(f"the pairing record of {target.get('url')} is incomplete; pair again")
    opened: list[Image] = []
    try:
        for spec in options.volumes:
            opened.append(Image(spec.path, options.block_size))
        shapes = {
            spec.volume_id: (image.size, image.block_size)
            for spec, image in zip(options.volumes, opened, strict=True)
        }
        with (
            TargetClient(
                target["url"],
                pem,
                source,
                connections=2,
                bucket=TokenBucket(options.max_rate) if options.max_rate else None,
            ) as client,
            AgentState.locked(source, target_core, options.agent_id) as state,
        ):
            _, resumed_run, abandoned = state.start_run(shapes)
            for session in abandoned:
                discard_session(client, options.agent_id, session)
            run = _Run(options, client, state)
            reports = [
                _DirectVolume(run, spec, image).push()
                for spec, image in zip(options.volumes, opened, strict=True)
            ]
            assert state.run is not None
            job_id, point_id = state.run["jobId"], state.run["recoveryPointId"]
            point_time = state.run["recoveryPointTimestamp"]
            state.finish_run()
            wire = client.counter
    except (ImageError, StateError, TransportError) as error:
        raise PushError(str(error)) from None
    finally:
        for image in opened:
            image.close()
    summed = (*SUMMED, "blocks_sent", "records_stored")
    point = (job_id, point_id, point_time)
    return {
        "direct": True,
        **run_summary(target, options.agent_id, point, resumed_run, reports, wire, started, summed),
    }
