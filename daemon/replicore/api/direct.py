"""Direct (O3E) replication: `slave/directreplicationsessions/new`, the snapshot file
(`directreplication/slave/{agentId}/{jobId}/{sessionId}`), its used-block bitmap (`.../bitmap`),
the data channel (`.../o3edata`), and `slave/agents/{agentId}/{jobId}/{sessionId}/fileinfo` and
`.../repoconnectiondescription`.

For sources that cannot hash: the source sends the bitmap of the blocks in use, then those
blocks in ascending order; the target hashes, deduplicates, stores and commits them as a
pushed image (store/direct.py). Every route is for paired sources on their own approved
agents; another source's agent or session, or an unknown one, is 404. Hashing and compressing
run on a worker thread outside the write lock. Wire formats: docs/protocol.md ("Direct
replication"); reference: docs/api/direct.md.
"""

from __future__ import annotations

import logging
import shutil
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import apsw
import msgspec
import trio
from quart import Blueprint, g, request, url_for

from .. import auth, bodies, metrics, protocol, runtime
from ..errors import (
    BadRequest,
    Conflict,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    Unprocessable,
)
from ..store import agents, direct, images, repositories, sessions
from .sessions import NewSessionBody, utc_timestamp

log = logging.getLogger("replicore.direct")

bp = Blueprint("direct", __name__)

#: Largest o3edata body (raw block bytes, or frames with their headers).
MAX_DATA_BYTES = 32 * 1024 * 1024
#: Blocks are hashed and stored in slices of about this many bytes.
SLICE_BYTES = 8 * 1024 * 1024
#: A request body that sends nothing for this long is given up.
BODY_IDLE_TIMEOUT = 60.0
BLOCK_INDEX_HEADER = "X-O3E-Block-Index"
CODEC_HEADER = "X-O3E-Codec"
CODECS = ("raw", "framed")
#: Frame header of the framed codec: stored length, codec (0 raw, 1 zstd).
_FRAME = struct.Struct(">IB")


class OpenInfoBody(bodies.Struct):
    block_size: int
    scid: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
    size: int
    volume_id: str
    image_type: Annotated[str, msgspec.Meta(max_length=64)] = ""
    partial: bool = False


class SnapshotFileBody(bodies.Struct):
    full_path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    open_info: OpenInfoBody


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _disk_free() -> int:
    return shutil.disk_usage(runtime.current().config.server.state_dir).free


def _session_uuid(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise NotFound(f"no open session {text!r}") from None


async def _own(
    agent_id: str, job_id: str, session_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    return await runtime.current().db.read(
        direct.own, g.core["id"], agent_id, job_id, _session_uuid(session_id)
    )


async def _body_chunks(limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, refusing more than `limit` bytes or a stalled body."""
    chunks = request.body.__aiter__()
    total = 0
    while True:
        chunk: bytes | None = None
        with trio.move_on_after(BODY_IDLE_TIMEOUT):
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
        if chunk is None:
            raise BadRequest(f"the request body stalled for {BODY_IDLE_TIMEOUT:.0f} s")
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
        yield chunk


# --------------------------------------------------------------------------
# Session, snapshot file, bitmap
# --------------------------------------------------------------------------


def _open(
    conn: apsw.Connection,
    core: dict[str, Any],
    agent_id: str,
    wanted: sessions.SessionRequest,
    now: float,
) -> dict[str, Any]:
    agent = agents.get(conn, core["id"], agent_id)
    if agent is None or agent["state"] != "approved":
        raise NotFound(
            f"this source has no approved agent {agent_id!r} on this core", field="agentId"
        )
    if agent["paused"] or core["paused"]:
        raise Conflict(f"replication of agent {agent_id} is paused on this core", field="agentId")
    return direct.open_session(conn, agent, wanted, now)


@bp.post("/slave/directreplicationsessions/new")
@auth.paired_source
async def new_direct_session() -> dict[str, Any]:
    """Paired source: open (or resume) the direct session of one volume image of its agent."""
    body = await bodies.json_body(NewSessionBody)  # the same fields as sessions/new
    try:
        protocol.check_block_size(body.block_size)
    except protocol.ProtocolError as error:
        raise Unprocessable(error.message, field="blockSize") from None
    previous = body.previous_epoch_number
    if previous is not None and previous >= body.epoch_number:
        raise Unprocessable(
            f"previousEpochNumber {previous} must be lower than epochNumber {body.epoch_number}",
            field="previousEpochNumber",
        )
    wanted = sessions.SessionRequest(
        job_id=body.job_id,
        driver_volume_id=body.driver_volume_id,
        epoch_number=body.epoch_number,
        previous_epoch_number=previous,
        block_size=body.block_size,
        size=body.size,
        recovery_point_id=body.recovery_point_id,
        recovery_point_timestamp=utc_timestamp(body.recovery_point_timestamp),
        volume_count=body.volume_count,
    )
    if _disk_free() <= 0:
        raise InsufficientStorage("the disk holding the database is full")
    answer: dict[str, Any] = await runtime.current().db.write(
        _open, g.core, body.agent_id, wanted, time.time()
    )
    if not answer["resumed"]:
        metrics.session_opened()
    log.info(
        "direct session %s %s for %s:%s of agent %s",
        answer["sessionId"],
        "resumed" if answer["resumed"] else "opened",
        wanted.driver_volume_id,
        wanted.epoch_number,
        body.agent_id,
    )
    return answer


@bp.post("/directreplication/slave/<agent_id>/<job_id>/<session_id>")
@auth.paired_source
async def snapshot_file(agent_id: str, job_id: str, session_id: str) -> dict[str, Any]:
    """Paired source: set the session's snapshot file (SCID and file info)."""
    session, _ = await _own(agent_id, job_id, session_id)
    body = await bodies.json_body(SnapshotFileBody)
    info = body.open_info
    answer: dict[str, Any] = await runtime.current().db.write(
        direct.set_file,
        session["id"],
        direct.FileInfo(
            full_path=body.full_path,
            scid=info.scid,
            block_size=info.block_size,
            size=info.size,
            volume_id=info.volume_id,
            image_type=info.image_type,
            partial=info.partial,
        ),
    )
    return answer


@bp.post("/directreplication/slave/<agent_id>/<job_id>/<session_id>/bitmap")
@auth.paired_source
async def bitmap(agent_id: str, job_id: str, session_id: str) -> dict[str, Any]:
    """Paired source: set the used-block bitmap (raw bytes, one bit per block, LSB first)."""
    session, _ = await _own(agent_id, job_id, session_id)
    expected = direct.bitmap_length(session["block_count"])
    # A little over the exact size is read, so a wrong length is answered 422, not 413.
    data = await bodies.raw_body(expected + 1024)
    direct.check_bitmap(data, session["block_count"])
    answer: dict[str, Any] = await runtime.current().db.write(
        direct.set_bitmap,
        session["id"],
        data,
        time.time(),
        level=runtime.current().config.replication.compression_level,
        disk_free=_disk_free(),
    )
    if answer.get("committed"):
        metrics.session_committed()
        log.info("direct session %s committed (no used block)", session["session_id"])
    return answer


# --------------------------------------------------------------------------
# Data channel
# --------------------------------------------------------------------------


def _block_index_header(block_count: int) -> int:
    text = request.headers.get(BLOCK_INDEX_HEADER)
    if text is None:
        raise BadRequest(
            f"the {BLOCK_INDEX_HEADER} header (index of the first block sent) is required",
            field=BLOCK_INDEX_HEADER,
        )
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or int(text) >= block_count:
        raise Unprocessable(
            f"{BLOCK_INDEX_HEADER} must be a block index 0..{block_count - 1}",
            field=BLOCK_INDEX_HEADER,
        )
    return int(text)


def _codec_header() -> str:
    codec = (request.headers.get(CODEC_HEADER) or "raw").strip().lower()
    if codec not in CODECS:
        raise Unprocessable(
            f"{CODEC_HEADER} must be one of {', '.join(CODECS)}", field=CODEC_HEADER
        )
    return codec


def _prepare(
    pending: list[tuple[int, int, int, bytes]], level: int
) -> tuple[list[direct.Block], Unprocessable | None]:
    """Decompress (framed zstd), hash and compress (raw) the blocks, in order, up to the
    first that fails."""
    ready: list[direct.Block] = []
    for index, length, codec, payload in pending:
        if codec == protocol.CODEC_ZSTD:
            try:
                raw = protocol.decompress_record(codec, payload, length)
            except protocol.ProtocolError as error:
                return ready, Unprocessable(
                    f"the frame of block {index} cannot be decompressed: {error.message}",
                    blockIndex=index,
                )
            ready.append(direct.Block(index, protocol.record_key(raw), length, codec, payload))
        else:
            stored_codec, data = protocol.compress_block(payload, level)
            ready.append(
                direct.Block(index, protocol.record_key(payload), length, stored_codec, data)
            )
    return ready, None


class _Receiver:
    """One o3edata request: cuts the body into the used blocks it carries, stores them in
    slices; the slice holding the session's last used block waits for the end of the body."""

    def __init__(self, session: dict[str, Any], state: dict[str, Any], first: int, codec: str):
        self.session = session
        self.codec = codec
        self.size, self.block_size = session["size"], session["block_size"]
        self.used: Iterator[int] = direct.used_indices(
            bytes(state["bitmap"]), first, session["block_count"]
        )
        self.current: int | None = next(self.used, None)
        self.buffer = bytearray()
        self.pending: list[tuple[int, int, int, bytes]] = []
        self.pending_bytes = 0
        self.level = runtime.current().config.replication.compression_level
        self.answer: dict[str, Any] = {**direct.progress(session, state), "committed": False}
        self.stored = 0
        self.already = 0

    def _length(self, index: int) -> int:
        return images.block_length(self.size, self.block_size, index)

    def _take(self) -> tuple[int, bytes] | None:
        """The next block's (codec, payload) if the buffer holds all of it."""
        assert self.current is not None
        length = self._length(self.current)
        if self.codec == "raw":
            if len(self.buffer) < length:
                return None
            payload = bytes(self.buffer[:length])
            del self.buffer[:length]
            return protocol.CODEC_RAW, payload
        if len(self.buffer) < _FRAME.size:
            return None
        stored, codec = _FRAME.unpack_from(self.buffer)
        if codec not in (protocol.CODEC_RAW, protocol.CODEC_ZSTD):
            raise Unprocessable(f"frame of block {self.current}: unknown codec {codec}")
        if codec == protocol.CODEC_RAW and stored != length:
            raise Unprocessable(
                f"frame of block {self.current}: a raw frame holds the {length} bytes of the"
                f" block, not {stored}",
                blockIndex=self.current,
            )
        if not 1 <= stored <= protocol.MAX_STORED_LENGTH:
            raise Unprocessable(
                f"frame of block {self.current}: stored length {stored} is not in"
                f" 1..{protocol.MAX_STORED_LENGTH}",
                blockIndex=self.current,
            )
        if len(self.buffer) < _FRAME.size + stored:
            return None
        payload = bytes(self.buffer[_FRAME.size : _FRAME.size + stored])
        del self.buffer[: _FRAME.size + stored]
        return codec, payload

    async def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        while self.buffer:
            if self.current is None:
                raise Unprocessable(
                    "the body goes on past the last used block of the bitmap: data beyond the"
                    " bitmap is refused (nothing of this request's last slice was kept)",
                    **self._counts(),
                )
            try:
                taken = self._take()
            except Unprocessable as error:
                await self.flush()  # the whole blocks before the bad frame are kept
                error.extra.update(self._counts(), nextBlockIndex=self.current)
                raise
            if taken is None:
                return
            codec, payload = taken
            self.pending.append((self.current, self._length(self.current), codec, payload))
            self.pending_bytes += len(payload)
            self.current = next(self.used, None)
            if self.pending_bytes >= SLICE_BYTES and self.current is not None:
                await self.flush()

    def _counts(self) -> dict[str, Any]:
        return {"stored": self.stored, "alreadyPresent": self.already}

    async def flush(self) -> None:
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        if not pending:
            return
        ready, error = await trio.to_thread.run_sync(_prepare, pending, self.level)
        if ready:
            next_after = pending[len(ready)][0] if len(ready) < len(pending) else self.current
            self.answer = await runtime.current().db.write(
                direct.receive,
                self.session["id"],
                ready,
                next_after,
                time.time(),
                disk_free=_disk_free(),
            )
            metrics.record_received(
                sum(len(block.data) for block in ready),
                len(ready),
                raw_nbytes=sum(block.raw_length for block in ready),
            )
            self.stored += self.answer["stored"]
            self.already += self.answer["alreadyPresent"]
        if error is not None:
            error.extra.update(self._counts())
            raise error

    async def finish(self) -> dict[str, Any]:
        if self.buffer:
            await self.flush()
            raise Unprocessable(
                f"the body ends inside block {self.current}; the blocks before it were kept",
                blockIndex=self.current,
                nextBlockIndex=self.current,
                **self._counts(),
            )
        await self.flush()
        return {**self.answer, **self._counts()}


@bp.post("/directreplication/slave/<agent_id>/<job_id>/<session_id>/o3edata")
@auth.paired_source
async def o3e_data(agent_id: str, job_id: str, session_id: str) -> dict[str, Any]:
    """Paired source: the next used blocks, in ascending order, from the block named by
    X-O3E-Block-Index; the session is committed when its last used block is in."""
    session, state = await _own(agent_id, job_id, session_id)
    if state["bitmap"] is None:
        raise Conflict("send the bitmap before the data")
    first = _block_index_header(session["block_count"])
    codec = _codec_header()
    if first != state["next_block"]:
        raise Conflict(
            f"the data must go on at block {state['next_block']}, not {first}",
            field=BLOCK_INDEX_HEADER,
            nextBlockIndex=state["next_block"],
        )
    length = request.content_length
    if length is not None and length > MAX_DATA_BYTES:
        raise PayloadTooLarge(f"body of {length} bytes is over the limit of {MAX_DATA_BYTES}")
    if length is not None and codec == "raw":
        left = direct.used_count_from(bytes(state["bitmap"]), first) * session["block_size"]
        if length > left:
            raise Unprocessable(
                f"the body ({length} bytes) is longer than all the used blocks left from block"
                f" {first}: data beyond the bitmap is refused"
            )
    receiver = _Receiver(session, state, first, codec)
    async for chunk in _body_chunks(MAX_DATA_BYTES):
        await receiver.feed(chunk)
    answer = await receiver.finish()
    if answer.get("committed"):
        metrics.session_committed()
        log.info("direct session %s committed as %s", session["session_id"], answer["volumeImage"])
    return answer


# --------------------------------------------------------------------------
# Snapshot file info and repository connection
# --------------------------------------------------------------------------


@bp.get("/slave/agents/<agent_id>/<job_id>/<session_id>/fileinfo")
@auth.paired_source
async def file_info(agent_id: str, job_id: str, session_id: str) -> dict[str, Any]:
    """Paired source: the session's snapshot file (o3ERemoteSnapshotFileInfo)."""
    session, state = await _own(agent_id, job_id, session_id)
    return direct.file_info(session, state)


def _repository_facts(conn: apsw.Connection, repository_id: int) -> dict[str, Any]:
    repository = repositories.by_id(conn, repository_id)
    return {
        "repository": repository,
        "used": repositories.used_bytes(conn, repository_id),
        "room": sessions.room(conn, repository_id),
    }


@bp.get("/slave/agents/<agent_id>/<job_id>/<session_id>/repoconnectiondescription")
@auth.paired_source
async def repo_connection_description(
    agent_id: str, job_id: str, session_id: str
) -> dict[str, Any]:
    """Paired source: how this session reaches its repository: the data URL, block size,
    capacity and free space, and the limits of one o3edata request."""
    session, state = await _own(agent_id, job_id, session_id)
    facts = await runtime.current().db.read(_repository_facts, session["repository_id"])
    repository, room = facts["repository"], facts["room"]
    disk = _disk_free()
    free = disk if room is None else max(0, min(room, disk))
    names = {"agent_id": agent_id, "job_id": job_id, "session_id": session["session_id"]}
    block_size = session["block_size"]
    return {
        **direct.progress(session, state),
        "agentId": agent_id,
        "jobId": job_id,
        "dataUrl": url_for("direct.o3e_data", _external=True, **names),
        "bitmapUrl": url_for("direct.bitmap", _external=True, **names),
        "snapshotFileUrl": url_for("direct.snapshot_file", _external=True, **names),
        "repositoryId": repository["id"],
        "repositoryName": repository["name"],
        "blockSize": block_size,
        "size": session["size"],
        "capacityBytes": repository["quota_bytes"],
        "usedBytes": facts["used"],
        "freeBytes": free,
        "maxBytesPerRequest": MAX_DATA_BYTES,
        "maxBlocksPerRequest": MAX_DATA_BYTES // block_size,
        "codecs": list(CODECS),
        "blockIndexHeader": BLOCK_INDEX_HEADER,
        "codecHeader": CODEC_HEADER,
    }
