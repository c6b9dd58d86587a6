"""Sources: the paired source cores (customer id, last heard from, agents, bytes stored), and
the operator's actions on one: pause and resume its replication, unpair it (optionally moving
its agents' data to the recycle bin). Sources in other states are listed below them."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import apsw
from quart import Response, request, url_for

from .. import runtime
from ..store import agents, audit, billing, cores, overview, recycle_bin
from ..store.db import rows
from .web import Who, act, bp, form_refused, page


def _sources(conn: apsw.Connection) -> dict[str, Any]:
    heard = overview.last_heard(conn)
    per_agent, _ = billing.stored_bytes(conn)
    stored: dict[int, int] = defaultdict(int)
    agent_core = {r["id"]: r["core_pk"] for r in rows(conn, "SELECT id, core_pk FROM agents")}
    for agent_pk, held in per_agent.items():
        if agent_pk in agent_core:
            stored[agent_core[agent_pk]] += held["unique"] + held["shared"]
    paired, others = [], []
    for source in cores.masters(conn, include_all=True):
        source["lastHeard"] = heard.get(source["requestId"])
        source["storedBytes"] = stored[source["requestId"]]
        if source["state"] == "approved":
            paired.append(source)
        elif source["state"] in ("denied", "unpaired"):
            others.append(source)
    return {"paired": paired, "others": others}


@bp.get("/sources")
async def sources() -> str:
    data = await runtime.current().db.read(_sources)
    return await page("sources.html", title="Sources", **data)


def set_pause(conn: apsw.Connection, operator: Who, core_pk: int, paused: bool) -> dict[str, Any]:
    core = overview.set_source_pause(conn, core_pk, paused)
    audit.record(
        conn,
        operator.actor,
        "source.pause" if paused else "source.resume",
        core["core_id"],
        client_address=operator.address,
        details={"hostName": core["host_name"]},
    )
    return core


def unpair_source(
    conn: apsw.Connection, operator: Who, core_pk: int, to_bin: bool
) -> dict[str, Any]:
    """End a source's pairing on the operator's word: its certificate gets 403 from now on;
    its agents and their recovery points stay, or with `to_bin` move to the recycle bin."""
    core = cores.unpair(conn, core_pk, delete_recovery_points=False, now=time.time())
    binned = []
    if to_bin:
        binned = recycle_bin.bin_core_agents(
            conn, core_pk, reason="operator", deleted_by=operator.actor, now=time.time()
        )
    audit.record(
        conn,
        operator.actor,
        "source.unpair",
        core["core_id"],
        client_address=operator.address,
        details={
            "hostName": core["host_name"],
            "agents": [a["agent_id"] for a in agents.for_core(conn, core_pk)],
            "binned": {b["agentId"]: b["entryId"] for b in binned},
        },
    )
    return {**core, "binned": binned}


def _name(core: dict[str, Any]) -> str:
    return str(core["host_name"] or core["core_id"])


@bp.post("/sources/<int:core_pk>/pause")
async def source_pause(core_pk: int) -> Response:
    return await act(
        "source.pause",
        f"source {core_pk}",
        set_pause,
        lambda core: f"Paused replication from {_name(core)}: its agents open no new session.",
        url_for("console.sources"),
        core_pk,
        True,
    )


@bp.post("/sources/<int:core_pk>/resume")
async def source_resume(core_pk: int) -> Response:
    return await act(
        "source.resume",
        f"source {core_pk}",
        set_pause,
        lambda core: f"Resumed replication from {_name(core)}.",
        url_for("console.sources"),
        core_pk,
        False,
    )


@bp.post("/sources/<int:core_pk>/unpair")
async def source_unpair(core_pk: int) -> Response:
    back = url_for("console.sources")
    form = await request.form
    if form.get("confirm") != "yes":
        return await form_refused("Tick the box to confirm unpairing the source.", back)
    to_bin = form.get("to_bin") == "yes"

    def done(core: dict[str, Any]) -> str:
        text = f"Unpaired {_name(core)}."
        if core["binned"]:
            text += f" {len(core['binned'])} agent(s) moved to the recycle bin."
        return text

    return await act(
        "source.unpair", f"source {core_pk}", unpair_source, done, back, core_pk, to_bin
    )
