"""The recycle bin: what sources (or the operator) deleted, kept `recycle_bin.retention_days`;
restore an entry, or purge it for good, as `replicore bin restore|purge` do (a purge is
followed by a garbage collection in the background, as the command runs one after it)."""

from __future__ import annotations

import logging
import time
from typing import Any

import apsw
from quart import Response, request, url_for

from .. import runtime
from ..api import housekeeping
from ..store import audit
from ..store import recycle_bin as bin_store
from .web import Who, act, bp, form_refused, page

log = logging.getLogger("replicore.console")


def _keep_for() -> float:
    return runtime.current().config.recycle_bin.retention_days * bin_store.DAY


@bp.get("/bin")
async def recycle_bin() -> str:
    entries = await runtime.current().db.read(bin_store.entries, _keep_for(), with_bytes=True)
    return await page("bin.html", title="Recycle bin", entries=entries)


@bp.get("/bin/<int:entry_id>")
async def bin_entry(entry_id: int) -> str:
    entry = await runtime.current().db.read(bin_store.describe, entry_id, _keep_for())
    return await page("bin_entry.html", title=f"Recycle bin entry {entry_id}", entry=entry)


def restore_entry(conn: apsw.Connection, operator: Who, entry_id: int) -> dict[str, Any]:
    done = bin_store.restore(conn, entry_id, time.time())
    audit.record(
        conn,
        operator.actor,
        "bin.restore",
        f"entry {entry_id}",
        client_address=operator.address,
        details={
            "sourceCoreId": done["sourceCoreId"],
            "agentId": done["agentId"],
            "recoveryPoints": done["recoveryPointCount"],
            "mergedIntoLiveAgent": done["mergedIntoLiveAgent"],
        },
    )
    return done


def purge_entry(conn: apsw.Connection, operator: Who, entry_id: int) -> dict[str, Any]:
    done = bin_store.purge(conn, entry_id, time.time())
    audit.record(
        conn,
        operator.actor,
        "bin.purge",
        str(entry_id),
        client_address=operator.address,
        details={
            "entries": 1,
            "sourceCoreId": done["sourceCoreId"],
            "agentId": done["agentId"],
            "recoveryPoints": done["recoveryPointCount"],
        },
    )
    return done


@bp.post("/bin/<int:entry_id>/restore")
async def bin_restore(entry_id: int) -> Response:
    def done(d: dict[str, Any]) -> str:
        into = " into the agent the source added again" if d["mergedIntoLiveAgent"] else ""
        return (
            f"Restored agent {d['agentId']} of source {d['sourceCoreId']} with"
            f" {d['recoveryPointCount']} recovery point(s){into}."
        )

    return await act(
        "bin.restore",
        f"entry {entry_id}",
        restore_entry,
        done,
        url_for("console.recycle_bin"),
        entry_id,
    )


async def _collect_garbage(rt: runtime.Runtime) -> None:
    try:
        report = await housekeeping.collect_garbage(rt)
    except Exception:
        log.exception("console: garbage collection after a purge failed")
        return
    log.info(
        "console: garbage collection after a purge freed %d records, %d bytes",
        report.deleted_records,
        report.freed_stored_bytes,
    )


@bp.post("/bin/<int:entry_id>/purge")
async def bin_purge(entry_id: int) -> Response:
    back = url_for("console.recycle_bin")
    form = await request.form
    if form.get("confirm") != "yes":
        return await form_refused("Tick the box to confirm purging the entry for good.", back)
    purged: list[dict[str, Any]] = []

    def done(d: dict[str, Any]) -> str:
        purged.append(d)
        return (
            f"Purged entry {entry_id}: agent {d['agentId']} of source {d['sourceCoreId']}"
            f" ({d['recoveryPointCount']} recovery point(s)). Space is given back by a garbage"
            " collection now running."
        )

    response = await act("bin.purge", str(entry_id), purge_entry, done, back, entry_id)
    rt = runtime.current()
    if purged and rt.nursery is not None:
        rt.nursery.start_soon(_collect_garbage, rt)
    return response
