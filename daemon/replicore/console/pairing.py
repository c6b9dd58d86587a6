"""Pairing requests: the confirmed ones awaiting a decision, approved (a repository for the
request and, if wanted, another per agent, or a new repository), denied with a reason, or
ignored; as `replicore pairing approve|deny|ignore` do, with the same audit rows."""

from __future__ import annotations

import time
from typing import Any

import apsw
from quart import Response, request, url_for

from .. import runtime
from ..errors import ApiError
from ..store import audit, cores, repositories
from .web import FormError, Who, act, bp, field, form_refused, page

#: Form value of the request-level repository choice meaning "a new one of the source's own".
OWN_REPOSITORY = ""


def _requests(conn: apsw.Connection) -> dict[str, Any]:
    found = cores.list_requests(conn)
    return {
        "requests": [cores.describe_master(conn, core) for core in found],
        "repositories": repositories.list_all(conn),
        "unconfirmed": int(
            conn.execute(
                "SELECT count(*) FROM master_cores WHERE state = 'unconfirmed'"
            ).fetchone()[0]
        ),
    }


@bp.get("/pairing")
async def pairing() -> str:
    data = await runtime.current().db.read(_requests)
    return await page("pairing.html", title="Pairing requests", **data)


def approve_request(
    conn: apsw.Connection,
    operator: Who,
    request_id: int,
    *,
    repository: str | None,
    new_repository: str | None,
    agent_repositories: dict[str, str],
    customer_id: str,
    email: str,
    comment: str,
) -> dict[str, Any]:
    """`replicore pairing approve` (after `replicore repository create` for a new named
    repository), each with its audit row, in the caller's transaction."""
    if new_repository:
        repositories.create(conn, new_repository)
        audit.record(
            conn,
            operator.actor,
            "repository.create",
            new_repository,
            client_address=operator.address,
            details={"quotaBytes": None, "forRequest": request_id},
        )
        repository = new_repository
    core = cores.approve(
        conn,
        request_id,
        repository=repository,
        agent_repositories=agent_repositories,
        customer_id=customer_id,
        email=email,
        comment=comment,
        decided_by=operator.actor,
        now=time.time(),
    )
    described = cores.describe_master(conn, core)
    audit.record(
        conn,
        operator.actor,
        "pairing.approve",
        f"request {request_id}",
        client_address=operator.address,
        details={
            "coreId": core["core_id"],
            "agents": {a["agentInfo"]["id"]: a["repositoryName"] for a in described["agents"]},
        },
    )
    return described


def deny_request(conn: apsw.Connection, operator: Who, request_id: int, reason: str) -> Any:
    core = cores.deny(conn, request_id, reason=reason, decided_by=operator.actor, now=time.time())
    audit.record(
        conn,
        operator.actor,
        "pairing.deny",
        f"request {request_id}",
        client_address=operator.address,
        details={"coreId": core["core_id"], "reason": reason},
    )
    return core


def ignore_request(conn: apsw.Connection, operator: Who, request_id: int) -> dict[str, Any]:
    core = cores.get(conn, request_id)
    cores.ignore(conn, request_id)
    audit.record(
        conn,
        operator.actor,
        "pairing.ignore",
        f"request {request_id}",
        client_address=operator.address,
    )
    return core


def _name(core: dict[str, Any]) -> str:
    info = core.get("masterCoreInfo")
    if info is not None:
        return str(info["hostName"] or info["id"])
    return str(core["host_name"] or core["core_id"])


@bp.post("/pairing/<int:request_id>/approve")
async def pairing_approve(request_id: int) -> Response:
    back = url_for("console.pairing")
    form = await request.form
    try:
        choice = field(form, "repository", "Repository", limit=64)
        new_repository = field(form, "new_repository", "New repository name", limit=64)
        if new_repository:
            repositories.check_name(new_repository)
        if new_repository and choice != OWN_REPOSITORY:
            raise FormError(
                "Choose an existing repository or name a new one, not both"
                f" ({choice!r} and {new_repository!r})."
            )
        per_agent = {}
        for key in form:
            if key.startswith("agent_repository:"):
                name = field(form, key, "Agent repository", limit=64)
                if name:
                    per_agent[key.removeprefix("agent_repository:")] = name
        details = {
            name: field(form, name, label, limit=limit)
            for name, label, limit in (
                ("customer_id", "Customer id", 256),
                ("email", "E-mail", 256),
                ("comment", "Comment", 1000),
            )
        }
    except ApiError as error:
        return await form_refused(error.message, back)
    except FormError as error:
        return await form_refused(str(error), back)
    return await act(
        "pairing.approve",
        f"request {request_id}",
        approve_request,
        lambda d: (
            f"Approved request {request_id} ({_name(d)}): "
            + ", ".join(f"{a['agentInfo']['id']} into {a['repositoryName']}" for a in d["agents"])
        ),
        back,
        request_id,
        repository=choice or None,
        new_repository=new_repository or None,
        agent_repositories=per_agent,
        customer_id=details["customer_id"],
        email=details["email"],
        comment=details["comment"],
    )


@bp.post("/pairing/<int:request_id>/deny")
async def pairing_deny(request_id: int) -> Response:
    back = url_for("console.pairing")
    form = await request.form
    try:
        reason = field(form, "reason", "Reason")
    except FormError as error:
        return await form_refused(str(error), back)
    return await act(
        "pairing.deny",
        f"request {request_id}",
        deny_request,
        lambda core: (
            f"Denied request {request_id} ({_name(core)}); the source is told at its next sync."
        ),
        back,
        request_id,
        reason,
    )


@bp.post("/pairing/<int:request_id>/ignore")
async def pairing_ignore(request_id: int) -> Response:
    return await act(
        "pairing.ignore",
        f"request {request_id}",
        ignore_request,
        lambda core: f"Dropped request {request_id} ({_name(core)}) without an answer.",
        url_for("console.pairing"),
        request_id,
    )
