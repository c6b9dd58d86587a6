"""The data path of one volume image: `slave/sessions/new`, `records/keys`, `records/rawdata`,
ending a session (`DELETE slave/...?commit=`, in the background with `slave/start/...` and
`slave/poke/...`), the transferred-blocks bitmaps, and the expiry of idle sessions.

Every route is for paired sources, on their own approved agents only: another source's
agent or session, or an unknown one, is 404 without saying which. Binary bodies use the
framing of `protocol.py` (docs/protocol.md); this module adds the session-level checks.
Verification (decompress + BLAKE3) runs on a worker thread outside the write lock, so that
parallel streams verify while another one writes; the store work runs through
`runtime.current().db`. Background commits live in the server's nursery with their state in
memory (`Runtime.extras["datapath.commits"]`); their outcome is also recoverable from the
database, since a commit is one transaction: the image is there or the session still is.
The reference is docs/api/datapath.md.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, ParamSpec, TypeVar

import apsw
import msgspec
import trio
from quart import Blueprint, Response, g, jsonify, request

from .. import auth, background, bodies, metrics, protocol, runtime
from ..errors import (
    ApiError,
    BadRequest,
    Conflict,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unprocessable,
)
from ..store import agents, images, sessions

log = logging.getLogger("replicore.datapath")

bp = Blueprint("datapath", __name__)

P = ParamSpec("P")
T = TypeVar("T")

#: A driverVolumeId or jobId: any token safe in a URL path segment.
SAFE_TOKEN = r"^[A-Za-z0-9._:{}-]{1,128}$"
MAX_EPOCH = 2**32 - 1
#: Largest image size accepted (1 PiB).
MAX_IMAGE_SIZE = 2**50
MAX_VOLUMES = 4096
#: Verified records are stored in slices of this many payload bytes (or frames), so a
#: 32 MiB batch never sits whole in memory and a cut stream keeps what arrived before.
SLICE_BYTES = 8 * 1024 * 1024
SLICE_FRAMES = 1024
#: A request body that sends nothing for this long is given up.
BODY_IDLE_TIMEOUT = 60.0
#: Finished background commits are remembered this long for `poke` (then from the database).
FINISHED_STATE_TTL = 3600.0
OCTETS = "application/octet-stream"


class NewSessionBody(bodies.Struct):
    agent_id: str
    job_id: Annotated[str, msgspec.Meta(pattern=SAFE_TOKEN)]
    driver_volume_id: Annotated[str, msgspec.Meta(pattern=SAFE_TOKEN)]
    epoch_number: Annotated[int, msgspec.Meta(ge=0, le=MAX_EPOCH)]
    block_size: int
    size: Annotated[int, msgspec.Meta(gt=0, le=MAX_IMAGE_SIZE)]
    recovery_point_id: Annotated[
        str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
    ]
    recovery_point_timestamp: str
    volume_count: Annotated[int, msgspec.Meta(ge=1, le=MAX_VOLUMES)]
    previous_epoch_number: Annotated[int, msgspec.Meta(ge=0, le=MAX_EPOCH)] | None = None


class CommitBody(bodies.Struct):
    block_count: Annotated[int, msgspec.Meta(ge=0)]
    keys_checksum: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}$")]


@dataclass
class EndState:
    """A background end (commit or discard) of one session, as `poke` reports it."""

    agent_pk: int
    commit: bool
    status: str = "running"  # running | done | failed
    error: ApiError | None = None
    finished_at: float | None = None


@dataclass
class _Totals:
    stored: int = 0
    already: int = 0
    pending: list[protocol.RecordFrame] = field(default_factory=list)
    pending_bytes: int = 0


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _states() -> dict[str, EndState]:
    states: dict[str, EndState] = runtime.current().extras.setdefault("datapath.commits", {})
    return states


def _disk_free() -> int:
    return shutil.disk_usage(runtime.current().config.server.state_dir).free


def _session_uuid(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise NotFound(f"no open session {text!r}") from None


def utc_timestamp(text: str, field_name: str = "recoveryPointTimestamp") -> str:
    """An ISO 8601 date and time, normalised to UTC `YYYY-MM-DDTHH:MM:SS[.ffffff]Z` (a time
    without an offset is taken as UTC)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise Unprocessable(
            f"{text!r} is not an ISO 8601 date and time", field=field_name
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _bool_arg(name: str) -> bool:
    value = (request.args.get(name) or "").lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise Unprocessable(f"query parameter {name} must be true or false", field=name)


def approved_agent(conn: apsw.Connection, core_pk: int, agent_id: str) -> dict[str, Any]:
    """The caller's approved agent, or 404 (unknown, not approved, or another source's)."""
    agent = agents.get(conn, core_pk, agent_id)
    if agent is None or agent["state"] != "approved":
        raise NotFound(
            f"this source has no approved agent {agent_id!r} on this core", field="agentId"
        )
    return agent


def _own_session(
    conn: apsw.Connection, core_pk: int, agent_id: str, job_id: str, session_id: str
) -> dict[str, Any]:
    agent = approved_agent(conn, core_pk, agent_id)
    session = sessions.for_agent(conn, agent["id"], job_id, session_id)
    if session is None:
        raise NotFound(f"agent {agent_id} has no open session {session_id} in job {job_id}")
    return session


async def _session(agent_id: str, job_id: str, session_id: str) -> dict[str, Any]:
    return await runtime.current().db.read(
        _own_session, g.core["id"], agent_id, job_id, _session_uuid(session_id)
    )


def _protocol_error(error: protocol.ProtocolError, **extra: Any) -> BadRequest:
    details = {"offset": error.offset, "blockIndex": error.index, **extra}
    return BadRequest(error.message, **{k: v for k, v in details.items() if v is not None})


def _octets(data: bytes, **headers: str) -> Response:
    return Response(data, status=200, content_type=OCTETS, headers=headers)


# --------------------------------------------------------------------------
# Opening a session
# --------------------------------------------------------------------------


def _session_request(body: NewSessionBody) -> sessions.SessionRequest:
    try:
        protocol.check_block_size(body.block_size)
    except protocol.ProtocolError as error:
        raise Unprocessable(error.message, field="blockSize") from None
    if body.previous_epoch_number is not None and body.previous_epoch_number >= (body.epoch_number):
        raise Unprocessable(
            f"previousEpochNumber {body.previous_epoch_number} must be lower than epochNumber"
            f" {body.epoch_number}",
            field="previousEpochNumber",
        )
    return sessions.SessionRequest(
        job_id=body.job_id,
        driver_volume_id=body.driver_volume_id,
        epoch_number=body.epoch_number,
        previous_epoch_number=body.previous_epoch_number,
        block_size=body.block_size,
        size=body.size,
        recovery_point_id=body.recovery_point_id,
        recovery_point_timestamp=utc_timestamp(body.recovery_point_timestamp),
        volume_count=body.volume_count,
    )


def _open(
    conn: apsw.Connection,
    core: dict[str, Any],
    agent_id: str,
    wanted: sessions.SessionRequest,
    now: float,
) -> dict[str, Any]:
    agent = approved_agent(conn, core["id"], agent_id)
    if agent["paused"] or core["paused"]:
        raise Conflict(f"replication of agent {agent_id} is paused on this core", field="agentId")
    return sessions.open_session(conn, agent, wanted, now)


@bp.post("/slave/sessions/new")
@auth.paired_source
async def new_session() -> dict[str, Any]:
    """Paired source: open (or resume) the session of one volume image of its agent."""
    body = await bodies.json_body(NewSessionBody)
    wanted = _session_request(body)
    if _disk_free() <= 0:
        raise InsufficientStorage("the disk holding the database is full")
    answer = await runtime.current().db.write(_open, g.core, body.agent_id, wanted, time.time())
    if not answer["resumed"]:
        metrics.session_opened()
    log.info(
        "session %s %s for %s:%s of agent %s",
        answer["sessionId"],
        "resumed" if answer["resumed"] else "opened",
        wanted.driver_volume_id,
        wanted.epoch_number,
        body.agent_id,
    )
    return answer


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------


def _decode_keys(session: dict[str, Any], body: bytes) -> list[protocol.KeyEntry]:
    try:
        entries = protocol.decode_keys(body)
    except protocol.ProtocolError as error:
        raise _protocol_error(error) from None
    return sessions.check_key_entries(session, entries)


@bp.post("/slave/<agent_id>/<job_id>/<session_id>/records/keys")
@auth.paired_source
async def record_keys(agent_id: str, job_id: str, session_id: str) -> Response:
    """Paired source: announce a batch of block keys (RKY1); answer the blocks whose records
    the agent's repository lacks (RMS1), reserving their size against the quota."""
    session = await _session(agent_id, job_id, session_id)
    body = await bodies.raw_body(protocol.MAX_KEYS_BATCH_BYTES)
    entries = await trio.to_thread.run_sync(_decode_keys, session, body)
    try:
        # Not synced on its own, as record batches: a resumed push announces every key again,
        # and the commit's synced transaction makes the keys durable with itself.
        missing = await runtime.current().db.write_unsynced(
            sessions.record_keys, session["id"], entries, time.time(), disk_free=_disk_free()
        )
    except InsufficientStorage as error:
        metrics.record_rejected(
            int(error.extra.get("neededBytes", 0)),
            int(error.extra.get("missingRecords", 0)),
            reason="quota",
        )
        raise
    _count_deduplicated(entries, missing)
    return _octets(protocol.encode_missing(missing))


def _count_deduplicated(entries: list[protocol.KeyEntry], missing: list[int]) -> None:
    """Metrics: the blocks of a key batch the repository already had."""
    wanted = set(missing)
    missing_keys = {entry.key for entry in entries if entry.index in wanted}
    present = [entry.length for entry in entries if entry.key not in missing_keys]
    if present:
        metrics.record_deduplicated(sum(present), len(present))


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


def _verify(
    frames: list[protocol.RecordFrame],
) -> tuple[list[sessions.VerifiedRecord], Unprocessable | None]:
    """Decompress and hash frames in order, up to the first that fails."""
    verified: list[sessions.VerifiedRecord] = []
    for frame in frames:
        try:
            raw = protocol.decompress_record(frame.codec, frame.payload, frame.raw_length)
        except protocol.ProtocolError as error:
            return verified, Unprocessable(
                f"the record of block {frame.index} cannot be decompressed: {error.message}",
                blockIndex=frame.index,
            )
        if protocol.record_key(raw) != frame.key:
            return verified, Unprocessable(
                f"the record of block {frame.index} does not match its key",
                blockIndex=frame.index,
            )
        verified.append(
            sessions.VerifiedRecord(
                frame.index, frame.key, frame.raw_length, frame.codec, frame.payload
            )
        )
    return verified, None


async def _flush(session_pk: int, totals: _Totals) -> None:
    """Verify and store the pending frames; raise the first record's error (with the
    counts of what was kept before it)."""
    frames, totals.pending, totals.pending_bytes = totals.pending, [], 0
    if not frames:
        return
    verified, error = await trio.to_thread.run_sync(_verify, frames)
    if verified:
        stored, already, refused = await runtime.current().db.write_unsynced(
            sessions.store_records, session_pk, verified, time.time()
        )
        totals.stored += stored
        totals.already += already
        accepted = verified[: stored + already]
        metrics.record_received(
            sum(len(record.data) for record in accepted),
            len(accepted),
            raw_nbytes=sum(record.raw_length for record in accepted),
        )
        if refused is not None:
            error, bad = refused, frames[len(accepted)]
        else:
            bad = frames[len(verified)] if error is not None else None
    else:
        bad = frames[0] if error is not None else None
    if error is not None:
        assert bad is not None
        metrics.record_rejected(len(bad.payload), 1, reason="mismatch")
        error.extra.update(stored=totals.stored, alreadyPresent=totals.already)
        raise error


async def _receive_records(
    session_pk: int, decoder: protocol.RecordStreamDecoder, totals: _Totals
) -> None:
    """Feed the request body to the decoder as it arrives, storing verified slices on the
    way; refuses a body over the batch limit or one that stalls."""
    limit = protocol.MAX_RAWDATA_BATCH_BYTES
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"body of {request.content_length} bytes is over the limit of {limit} bytes"
        )
    received = 0
    # One scope for the whole body, its deadline pushed on by every chunk (cheaper than a
    # scope per 16 KiB chunk); storing a slice does not count as idle.
    with trio.CancelScope() as idle:
        idle.deadline = trio.current_time() + BODY_IDLE_TIMEOUT
        async for chunk in request.body:
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
            decoder.feed(chunk)
            while (frame := decoder.next_event()) is not None:
                totals.pending.append(frame)
                totals.pending_bytes += len(frame.payload)
                if totals.pending_bytes >= SLICE_BYTES or len(totals.pending) >= SLICE_FRAMES:
                    idle.deadline = math.inf
                    await _flush(session_pk, totals)
            idle.deadline = trio.current_time() + BODY_IDLE_TIMEOUT
    if idle.cancelled_caught:
        raise BadRequest(f"the request body stalled for {BODY_IDLE_TIMEOUT:.0f} s")
    decoder.finish()


@bp.post("/slave/<agent_id>/<job_id>/<session_id>/records/rawdata")
@auth.paired_source
async def record_data(agent_id: str, job_id: str, session_id: str) -> dict[str, Any]:
    """Paired source: a batch of records (RRD1), each verified against its key and stored
    once per repository, in order: the records before a bad one (or before the point where
    the body went wrong) are kept, and the error says how many."""
    session = await _session(agent_id, job_id, session_id)
    decoder = protocol.RecordStreamDecoder(max_raw=session["block_size"])
    totals = _Totals()
    with metrics.uploading():
        try:
            await _receive_records(session["id"], decoder, totals)
        except protocol.ProtocolError as error:
            await _flush(session["id"], totals)
            metrics.record_rejected(0, 1, reason="malformed")
            raise _protocol_error(
                error, stored=totals.stored, alreadyPresent=totals.already
            ) from None
        except (BadRequest, PayloadTooLarge) as error:
            await _flush(session["id"], totals)
            metrics.record_rejected(0, 1, reason="malformed")
            error.extra.update(stored=totals.stored, alreadyPresent=totals.already)
            raise
        await _flush(session["id"], totals)
    return {"stored": totals.stored, "alreadyPresent": totals.already}


# --------------------------------------------------------------------------
# Ending a session
# --------------------------------------------------------------------------


async def _end_arguments(session: dict[str, Any]) -> tuple[bool, int, str]:
    commit = _bool_arg("commit")
    if not commit:
        return False, 0, ""
    body = await bodies.json_body(CommitBody)
    if body.block_count != session["block_count"]:
        raise Unprocessable(
            f"blockCount {body.block_count} differs from the image's"
            f" {session['block_count']} blocks",
            field="blockCount",
        )
    return True, body.block_count, body.keys_checksum


async def _end(session_pk: int, commit: bool, block_count: int, checksum: str) -> dict[str, Any]:
    if commit:
        answer = await runtime.current().db.write(
            sessions.commit, session_pk, block_count, checksum, time.time()
        )
        metrics.session_committed()
        return answer
    await runtime.current().db.write(sessions.discard, session_pk)
    metrics.session_discarded("source")
    return {"committed": False, "discarded": True}


def _refuse_while_running(session: dict[str, Any]) -> None:
    state = _states().get(session["session_id"])
    if state is not None and state.status == "running":
        raise Conflict("this session is already being ended in the background; poke it")


@bp.delete("/slave/<agent_id>/<job_id>/<session_id>")
@auth.paired_source
async def end_session(agent_id: str, job_id: str, session_id: str) -> dict[str, Any]:
    """Paired source: commit (checks, then one transaction) or discard the session."""
    session = await _session(agent_id, job_id, session_id)
    commit, block_count, checksum = await _end_arguments(session)
    _refuse_while_running(session)
    answer = await _end(session["id"], commit, block_count, checksum)
    log.info("session %s %s", session["session_id"], "committed" if commit else "discarded")
    return answer


async def _end_in_background(
    state: EndState, session: dict[str, Any], commit: bool, block_count: int, checksum: str
) -> None:
    try:
        await _end(session["id"], commit, block_count, checksum)
    except ApiError as error:
        state.status, state.error = "failed", error
        log.info("background end of session %s failed: %s", session["session_id"], error)
    except Exception:
        log.exception("background end of session %s failed", session["session_id"])
        state.status = "failed"
        state.error = ApiError("the commit failed on the server; see its log")
    else:
        state.status = "done"
        log.info(
            "session %s %s in the background",
            session["session_id"],
            "committed" if commit else "discarded",
        )
    state.finished_at = time.time()


@bp.delete("/slave/start/<agent_id>/<job_id>/<session_id>")
@auth.paired_source
async def start_end_session(agent_id: str, job_id: str, session_id: str) -> tuple[Any, int]:
    """Paired source: start committing (or discarding) the session in the background; `poke`
    reports the outcome."""
    rt = runtime.current()
    session = await _session(agent_id, job_id, session_id)
    commit, block_count, checksum = await _end_arguments(session)
    states = _states()
    state = states.get(session["session_id"])
    if state is None or state.status != "running":
        if rt.nursery is None:
            raise ServiceUnavailable("this server cannot run background work")
        state = EndState(agent_pk=session["agent_pk"], commit=commit)
        states[session["session_id"]] = state
        rt.nursery.start_soon(_end_in_background, state, session, commit, block_count, checksum)
    return jsonify({"started": True}), 202


def _poke_outcome(
    conn: apsw.Connection, core_pk: int, agent_id: str, job_id: str, session_id: str
) -> tuple[int, bool, bool]:
    """(agent pk, committed image exists, session still open)."""
    agent = approved_agent(conn, core_pk, agent_id)
    committed = images.committed_by_session(conn, agent["id"], session_id) is not None
    still_open = sessions.for_agent(conn, agent["id"], job_id, session_id) is not None
    return agent["id"], committed, still_open


@bp.post("/slave/poke/<agent_id>/<job_id>/<session_id>")
@auth.paired_source
async def poke(agent_id: str, job_id: str, session_id: str) -> Response:
    """Paired source: false while a background end runs, true once committed (or discarded
    as asked), the error if it failed."""
    sid = _session_uuid(session_id)
    agent_pk, committed, still_open = await runtime.current().db.read(
        _poke_outcome, g.core["id"], agent_id, job_id, sid
    )
    state = _states().get(sid)
    if state is not None and state.agent_pk == agent_pk:
        if state.status == "running":
            return jsonify(False)
        if state.status == "failed" and state.error is not None and still_open:
            raise state.error
        if state.status == "done":
            return jsonify(True)
    if committed:
        return jsonify(True)
    if still_open:
        raise Conflict(
            "no commit of this session is running (the server may have restarted);"
            " end the session again"
        )
    raise NotFound(f"agent {agent_id} has no session {session_id} in job {job_id}")


# --------------------------------------------------------------------------
# Transferred blocks
# --------------------------------------------------------------------------


def _session_bitmap(conn: apsw.Connection, core_pk: int, session_id: str) -> tuple[bytes, int]:
    session = sessions.for_core(conn, core_pk, session_id)
    if session is None:
        raise NotFound(f"no open session {session_id}")
    return sessions.transferred_bitmap(conn, session), session["block_count"]


def _image_bitmap(
    conn: apsw.Connection, core_pk: int, agent_id: str, volume: str, epoch: int
) -> tuple[bytes, int]:
    agent = approved_agent(conn, core_pk, agent_id)
    image = images.find(conn, agent["id"], volume, epoch)
    if image is not None:
        return sessions.full_bitmap(image["block_count"]), image["block_count"]
    session = sessions.for_epoch(conn, agent["id"], volume, epoch)
    if session is None:
        raise NotFound(f"agent {agent_id} has no volume image or open session {volume}:{epoch}")
    return sessions.transferred_bitmap(conn, session), session["block_count"]


@bp.get("/slave/sessions/<session_id>/transferredblocks")
@auth.paired_source
async def session_transferred_blocks(session_id: str) -> Response:
    """Paired source: the bitmap of the blocks of its open session that are durable."""
    bits, count = await runtime.current().db.read_durable(
        _session_bitmap, g.core["id"], _session_uuid(session_id)
    )
    return _octets(bits, **{"X-Block-Count": str(count)})


@bp.get("/slave/<agent_id>/<volume_driver_id>/<epoch_number>/transferredblocks")
@auth.paired_source
async def image_transferred_blocks(
    agent_id: str, volume_driver_id: str, epoch_number: str
) -> Response:
    """Paired source: the same bitmap by image (all ones once committed)."""
    if not (epoch_number.isascii() and epoch_number.isdigit()) or int(epoch_number) > MAX_EPOCH:
        raise Unprocessable("epochNumber must be an integer 0..4294967295", field="epochNumber")
    bits, count = await runtime.current().db.read_durable(
        _image_bitmap, g.core["id"], agent_id, volume_driver_id, int(epoch_number)
    )
    return _octets(bits, **{"X-Block-Count": str(count)})


# --------------------------------------------------------------------------
# Expiry of idle sessions
# --------------------------------------------------------------------------


async def expire_sessions(rt: runtime.Runtime) -> list[str]:
    """Discard the sessions idle longer than `replication.session_timeout` (not those being
    ended in the background); forget old background outcomes. Returns the expired ids."""
    states: dict[str, EndState] = rt.extras.setdefault("datapath.commits", {})
    now = time.time()
    running = frozenset(sid for sid, state in states.items() if state.status == "running")
    expired = await rt.db.write(
        sessions.expire, now - rt.config.replication.session_timeout, running
    )
    for sid in expired:
        metrics.session_discarded("expired")
        log.info("session %s expired after %.0f s idle", sid, rt.config.replication.session_timeout)
    for sid, state in list(states.items()):
        if state.finished_at is not None and state.finished_at < now - FINISHED_STATE_TTL:
            del states[sid]
    return expired


background.periodic(
    bp,
    "session-expiry",
    expire_sessions,
    lambda rt: background.sweep_interval(rt.config.replication.session_timeout),
)
