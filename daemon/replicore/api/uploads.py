"""File upload sessions: `slave/newsession/`, `slave/sessions/{uploadSessionId}/data/{dataSize}`,
`slave/sessions/{uploadSessionId}/` (POST ends, DELETE cancels), and the sweep that expires
abandoned sessions (`[uploads] session_timeout`) and removes files nothing refers to.

Session ids are UUIDs (the `uuid` converter keeps these routes apart from the data path's
`slave/sessions/new`). All routes are for paired sources, each seeing only its own sessions.
Requests on one session run one at a time (a lock per session), so the offset check and the
write of a chunk cannot interleave with another chunk, the end or a cancel.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import msgspec
import trio
from quart import Blueprint, g, request

from .. import auth, background, runtime
from ..bodies import Count, Struct, json_body, raw_body
from ..errors import BadRequest, PayloadTooLarge, Unprocessable
from ..runtime import Runtime
from ..store import exchange, uploads
from .jobs import iso

log = logging.getLogger("replicore.uploads")

bp = Blueprint("uploads", __name__)

OFFSET_HEADER = "X-Upload-Offset"


class NewSessionBody(Struct):
    file_name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    size: Count
    md5: str
    purpose: str


def _session_lock(session_id: str) -> trio.Lock:
    locks: dict[str, trio.Lock] = runtime.current().extras.setdefault("upload_locks", {})
    return locks.setdefault(session_id, trio.Lock())


def _drop_lock(session_id: str) -> None:
    runtime.current().extras.get("upload_locks", {}).pop(session_id, None)


def files_lock(rt: Runtime) -> trio.Lock:
    """Held while a DLL file is placed and recorded, and while unreferenced files are
    removed, so that the sweep never removes a file about to be recorded."""
    lock: trio.Lock = rt.extras.setdefault("exchange_files_lock", trio.Lock())
    return lock


def session_view(session: dict[str, Any]) -> dict[str, Any]:
    return {
        "uploadSessionId": session["session_id"],
        "fileName": session["file_name"],
        "size": session["size"],
        "md5": session["md5"],
        "purpose": session["purpose"],
        "state": session["state"],
        "received": session["received"],
    }


@bp.post("/slave/newsession/")
@bp.post("/slave/newsession")
@auth.paired_source
async def new_session() -> tuple[dict[str, Any], int]:
    """Paired source: open an upload session for one file (fileName, size, md5, purpose);
    201 with its uploadSessionId."""
    rt = runtime.current()
    body = await json_body(NewSessionBody)
    if body.purpose == "exchange-dll":
        exchange.check_file_name(body.file_name)
    session_id = await rt.db.write(
        uploads.create,
        g.core["id"],
        body.file_name,
        body.size,
        body.md5,
        body.purpose,
        time.time(),
        max_bytes=rt.config.uploads.max_file_bytes,
        max_open=rt.config.uploads.max_open_sessions,
        disk_free=shutil.disk_usage(rt.config.server.state_dir).free,
    )
    session = await rt.db.read(uploads.get, g.core["id"], session_id)
    return session_view(session), 201


def _offset_header() -> int:
    value = request.headers.get(OFFSET_HEADER)
    if value is None:
        raise BadRequest(f"header {OFFSET_HEADER} (bytes received so far) is required")
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(f"header {OFFSET_HEADER} must be a non-negative integer")
    return int(value)


@bp.post("/slave/sessions/<uuid:upload_session_id>/data/<data_size>")
@auth.paired_source
async def upload_data(upload_session_id: uuid.UUID, data_size: str) -> dict[str, Any]:
    """Paired source: append one chunk. Its length must equal dataSize (422) and
    X-Upload-Offset must equal the bytes received so far (409 with expectedOffset)."""
    rt = runtime.current()
    session_id, core_pk = str(upload_session_id), g.core["id"]
    if not (data_size.isascii() and data_size.isdigit()) or int(data_size) < 1:
        raise Unprocessable("dataSize must be a positive integer", field="dataSize")
    size = int(data_size)
    limit = rt.config.server.max_request_bytes
    if size > limit:
        raise PayloadTooLarge(f"a chunk is at most {limit} bytes", field="dataSize")
    offset = _offset_header()
    session = await rt.db.read(uploads.get, core_pk, session_id)
    uploads.require_open(session)
    uploads.check_offset(session, offset)  # again under the lock; here it spares the body
    data = await raw_body(limit)
    if len(data) != size:
        raise Unprocessable(
            f"the chunk has {len(data)} bytes, dataSize says {size}", field="dataSize"
        )
    if offset + size > session["size"]:
        raise Unprocessable(
            f"the chunk ends at byte {offset + size}, past the file's size {session['size']}",
            field="dataSize",
        )
    async with _session_lock(session_id):
        session = await rt.db.read(uploads.get, core_pk, session_id)
        uploads.require_open(session)
        uploads.check_offset(session, offset)
        path = uploads.part_path(rt.config.server.state_dir, session_id)
        await trio.to_thread.run_sync(uploads.write_chunk, path, offset, data)
        received = await rt.db.write(
            uploads.record_chunk, core_pk, session_id, offset, size, time.time()
        )
    return {"uploadSessionId": session_id, "received": received, "size": session["size"]}


def _complete_dll(
    conn: Any,
    core_pk: int,
    session_id: str,
    info: exchange.DllInfo,
    answer: dict[str, Any],
    now: float,
) -> dict[str, Any]:
    stored = exchange.add(conn, core_pk, info, now)
    answer = {**answer, "state": "completed", "exchangeDll": exchange.api_row(stored)}
    answer["exchangeDll"]["uploadedAt"] = iso(stored["uploaded_at"])
    uploads.finish(conn, core_pk, session_id, "completed", now, result=json.dumps(answer))
    return answer


async def _reject(session_id: str, path: Path, error: Unprocessable) -> Unprocessable:
    """Fail the session for good and drop its file; returns the error to raise."""
    await runtime.current().db.write(
        uploads.finish, g.core["id"], session_id, "failed", time.time(), error=error.message
    )
    path.unlink(missing_ok=True)
    return error


@bp.post("/slave/sessions/<uuid:upload_session_id>/")
@bp.post("/slave/sessions/<uuid:upload_session_id>")
@auth.paired_source
async def end_session(upload_session_id: uuid.UUID) -> dict[str, Any]:
    """Paired source: end the upload. All `size` bytes must be there (422, the session
    stays open); the MD5 must match and the file must suit its purpose (422, the session
    fails and the file is deleted). A retried end of a completed session answers the same."""
    rt = runtime.current()
    session_id, core_pk = str(upload_session_id), g.core["id"]
    async with _session_lock(session_id):
        session = await rt.db.read(uploads.get, core_pk, session_id)
        if session["state"] == "completed" and session["result"]:
            answer: dict[str, Any] = json.loads(session["result"])
            return answer
        uploads.require_open(session)
        if session["received"] != session["size"]:
            raise Unprocessable(
                f"the upload has {session['received']} of {session['size']} bytes",
                field="size",
                received=session["received"],
            )
        path = uploads.part_path(rt.config.server.state_dir, session_id)
        if session["size"] == 0:
            await trio.to_thread.run_sync(uploads.write_chunk, path, 0, b"")
        actual = await trio.to_thread.run_sync(uploads.file_md5, path)
        if actual != session["md5"]:
            raise await _reject(
                session_id,
                path,
                Unprocessable(
                    f"MD5 of the received file is {actual}, not {session['md5']}",
                    field="md5",
                    actualMd5=actual,
                ),
            )
        answer = {**session_view(session), "state": "completed"}
        # The only purpose so far; uploads.create refuses any other.
        try:
            info = await trio.to_thread.run_sync(exchange.inspect, path, session["file_name"])
            if info.product_version is None:
                raise Unprocessable(
                    f"{session['file_name']} has no version resource", field="fileName"
                )
        except Unprocessable as error:
            raise await _reject(session_id, path, error) from None
        async with files_lock(rt):
            await trio.to_thread.run_sync(
                exchange.place_file, rt.config.server.state_dir, path, info.sha256
            )
            answer = await rt.db.write(
                _complete_dll, core_pk, session_id, info, answer, time.time()
            )
    _drop_lock(session_id)
    return answer


@bp.delete("/slave/sessions/<uuid:upload_session_id>/")
@bp.delete("/slave/sessions/<uuid:upload_session_id>")
@auth.paired_source
async def cancel_session(upload_session_id: uuid.UUID) -> tuple[str, int]:
    """Paired source: cancel the upload and free its space; 204, also when it had already
    ended without a file (cancelled, failed, expired); 409 when it completed."""
    rt = runtime.current()
    session_id, core_pk = str(upload_session_id), g.core["id"]
    async with _session_lock(session_id):
        session = await rt.db.read(uploads.get, core_pk, session_id)
        if session["state"] == "completed":
            uploads.require_open(session)
        if session["state"] == "open":
            await rt.db.write(
                uploads.finish, core_pk, session_id, "cancelled", time.time(), error="cancelled"
            )
        uploads.part_path(rt.config.server.state_dir, session_id).unlink(missing_ok=True)
    _drop_lock(session_id)
    return "", 204


async def sweep_uploads(rt: Runtime, now: float) -> None:
    """Expire idle sessions and remove the files nothing refers to any more."""
    state_dir = rt.config.server.state_dir
    timeout = rt.config.uploads.session_timeout
    expired = await rt.db.write(uploads.expire, now, timeout)
    for session_id in expired:
        uploads.part_path(state_dir, session_id).unlink(missing_ok=True)
    if expired:
        log.info("expired %d upload session(s) idle for %g s", len(expired), timeout)
    keep = await rt.db.read(uploads.open_ids)
    locks: dict[str, trio.Lock] = rt.extras.get("upload_locks", {})
    for session_id in [s for s, lock in locks.items() if s not in keep and not lock.locked()]:
        del locks[session_id]
    await trio.to_thread.run_sync(
        uploads.remove_stray_parts, state_dir, keep, now - max(timeout, 60.0)
    )
    async with files_lock(rt):
        digests = await rt.db.read(exchange.referenced)
        await trio.to_thread.run_sync(exchange.remove_unreferenced, state_dir, digests)


async def _sweep(rt: Runtime) -> None:
    await sweep_uploads(rt, time.time())


background.periodic(
    bp,
    "upload-sweep",
    _sweep,
    lambda rt: background.sweep_interval(rt.config.uploads.session_timeout),
)
