"""Agents and their recovery points: every source's agents; per agent its recovery points and
volume images (orphaned and damaged ones flagged) with the `replicore export` command line
that writes each image back out; and the operator's actions, as `replicore agents
pause|resume|delete|approve|deny` do them, each with an audit row."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import apsw
from quart import Response, request, url_for

from .. import runtime
from ..errors import NotFound
from ..store import audit, inventory, jobs, overview, recycle_bin, repositories, retention, verify
from .web import FormError, Who, act, bp, field, form_refused, page

#: Recovery points shown on an agent's page (newest first).
PAGE_POINTS = 200


def _agents(conn: apsw.Connection) -> dict[str, Any]:
    """Agents of paired (or once paired) sources, and any agent holding recovery points; the
    agents of undecided pairing requests are on the pairing page."""
    found = [
        a
        for a in inventory.find_agents(conn)
        if a["source_state"] in ("approved", "unpaired") or a["recovery_point_count"]
    ]
    orphaned = Counter(o["agent_pk"] for o in overview.orphaned_images(conn))
    damaged = Counter(d["agentId"] + "\0" + d["sourceCoreId"] for d in verify.damaged_images(conn))
    for agent in found:
        agent["protected_bytes"] = inventory.protected_bytes(conn, agent["id"])
        agent["orphaned"] = orphaned[agent["id"]]
        agent["damaged"] = damaged[agent["agent_id"] + "\0" + agent["source_core_id"]]
    return {"agents": found, "repositories": repositories.list_all(conn)}


@bp.get("/agents")
async def agents() -> str:
    data = await runtime.current().db.read(_agents)
    return await page("agents.html", title="Agents", **data)


def one(conn: apsw.Connection, agent_pk: int) -> dict[str, Any]:
    """The agent of row id `agent_pk` as `inventory.find_agents` describes it; NotFound."""
    for agent in inventory.find_agents(conn):
        if agent["id"] == agent_pk:
            return agent
    raise NotFound(f"no agent {agent_pk} on this core (deleted, or in the recycle bin)")


def export_command(agent: dict[str, Any], image: dict[str, Any]) -> list[str]:
    volume, epoch = image["driverVolumeId"], image["epochNumber"]
    return [
        "replicore",
        "export",
        "--agent",
        agent["agent_id"],
        "--source",
        agent["source_core_id"],
        "--volume",
        volume,
        "--epoch",
        str(epoch),
        "-o",
        f"{agent['agent_id']}-{volume}-{epoch}.img",
    ]


def _agent_page(conn: apsw.Connection, agent_pk: int) -> dict[str, Any]:
    agent = one(conn, agent_pk)
    images = inventory.volume_images(conn, agent_pk)
    for image in images:
        image["command"] = export_command(agent, image)
    damaged = {d["volumeImage"]: d for d in verify.damaged_images(conn, (agent_pk,))}
    policy, origin = retention.effective_policy(conn, agent_pk)
    usage = next(
        (u for u in inventory.usage(conn, agent["core_pk"]) if u["agentId"] == agent["agent_id"]),
        None,
    )
    return {
        "agent": agent,
        "points": inventory.recovery_points(conn, agent_pk, 0, PAGE_POINTS),
        "point_count": inventory.recovery_point_count(conn, agent_pk),
        "images": images,
        "damaged": damaged,
        "job": jobs.current_for_agent(conn, agent_pk),
        "policy": policy,
        "policy_origin": origin,
        "usage": usage,
        "protected_bytes": inventory.protected_bytes(conn, agent_pk),
        "repositories": repositories.list_all(conn),
    }


@bp.get("/agents/<int:agent_pk>")
async def agent(agent_pk: int) -> str:
    data = await runtime.current().db.read(_agent_page, agent_pk)
    name = data["agent"]["display_name"] or data["agent"]["agent_id"]
    return await page("agent.html", title=f"Agent {name}", **data)


def _target(agent: dict[str, Any]) -> str:
    """The audit target of an agent, as `replicore agents` writes it."""
    return f"agent {agent['agent_id']} of source {agent['source_core_id']}"


def set_pause(conn: apsw.Connection, operator: Who, agent_pk: int, paused: bool) -> dict[str, Any]:
    agent = one(conn, agent_pk)
    inventory.set_operator_pause(conn, agent_pk, paused)
    audit.record(
        conn,
        operator.actor,
        "agent.pause" if paused else "agent.resume",
        _target(agent),
        client_address=operator.address,
    )
    return agent


def delete_agent(conn: apsw.Connection, operator: Who, agent_pk: int) -> dict[str, Any]:
    agent = one(conn, agent_pk)
    done = recycle_bin.bin_agent(
        conn, agent_pk, reason="operator", deleted_by=operator.actor, now=time.time()
    )
    audit.record(
        conn,
        operator.actor,
        "agent.delete",
        _target(agent),
        client_address=operator.address,
        details={"binEntry": done["entryId"], "recoveryPoints": done["recoveryPointCount"]},
    )
    return {**agent, **done}


def approve_agent(
    conn: apsw.Connection, operator: Who, agent_pk: int, repository: str | None
) -> dict[str, Any]:
    agent = one(conn, agent_pk)
    done = inventory.approve_agent(conn, agent_pk, repository, time.time())
    audit.record(
        conn,
        operator.actor,
        "agent.approve",
        _target(agent),
        client_address=operator.address,
        details={"repository": done["repositoryName"]},
    )
    return {**agent, **done}


def deny_agent(conn: apsw.Connection, operator: Who, agent_pk: int) -> dict[str, Any]:
    agent = one(conn, agent_pk)
    inventory.deny_agent(conn, agent_pk)
    audit.record(
        conn, operator.actor, "agent.deny", _target(agent), client_address=operator.address
    )
    return agent


def _back(default: str) -> str:
    """Where an action returns: the page it came from (agents list or the agent's page)."""
    chosen = request.args.get("back", "")
    return url_for("console.agents") if chosen == "list" else default


@bp.post("/agents/<int:agent_pk>/pause")
async def agent_pause(agent_pk: int) -> Response:
    return await act(
        "agent.pause",
        f"agent {agent_pk}",
        set_pause,
        lambda a: f"Paused agent {a['agent_id']}: it opens no new session until resumed.",
        _back(url_for("console.agent", agent_pk=agent_pk)),
        agent_pk,
        True,
    )


@bp.post("/agents/<int:agent_pk>/resume")
async def agent_resume(agent_pk: int) -> Response:
    return await act(
        "agent.resume",
        f"agent {agent_pk}",
        set_pause,
        lambda a: f"Resumed agent {a['agent_id']}.",
        _back(url_for("console.agent", agent_pk=agent_pk)),
        agent_pk,
        False,
    )


@bp.post("/agents/<int:agent_pk>/delete")
async def agent_delete(agent_pk: int) -> Response:
    form = await request.form
    if form.get("confirm") != "yes":
        return await form_refused(
            "Tick the box to confirm moving the agent to the recycle bin.",
            url_for("console.agent", agent_pk=agent_pk),
        )

    def done(a: dict[str, Any]) -> str:
        if a["entryId"] is None:
            return f"Deleted agent {a['agent_id']} (it had no recovery points)."
        return (
            f"Moved agent {a['agent_id']} with {a['recoveryPointCount']} recovery point(s) to"
            f" the recycle bin (entry {a['entryId']})."
        )

    return await act(
        "agent.delete",
        f"agent {agent_pk}",
        delete_agent,
        done,
        url_for("console.recycle_bin"),
        agent_pk,
    )


@bp.post("/agents/<int:agent_pk>/approve")
async def agent_approve(agent_pk: int) -> Response:
    back = _back(url_for("console.agent", agent_pk=agent_pk))
    form = await request.form
    try:
        repository = field(form, "repository", "Repository", limit=64) or None
    except FormError as error:
        return await form_refused(str(error), back)
    return await act(
        "agent.approve",
        f"agent {agent_pk}",
        approve_agent,
        lambda a: f"Approved agent {a['agent_id']} into repository {a['repositoryName']}.",
        back,
        agent_pk,
        repository,
    )


@bp.post("/agents/<int:agent_pk>/deny")
async def agent_deny(agent_pk: int) -> Response:
    return await act(
        "agent.deny",
        f"agent {agent_pk}",
        deny_agent,
        lambda a: f"Denied agent {a['agent_id']}.",
        _back(url_for("console.agent", agent_pk=agent_pk)),
        agent_pk,
    )
