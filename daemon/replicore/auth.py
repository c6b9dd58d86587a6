"""Who is calling: the access level every route declares, checked before its body is read.

Levels (each route is decorated with exactly one):
- `anonymous`: anyone over TLS.
- `known_source`: a client certificate the target has on record in a trusted state
  (unconfirmed, pending, approved, denied); 401 without one.
- `paired_source`: a certificate whose pairing is approved; 401 without a certificate or with
  one not on record, 403 naming the state otherwise. The core row is in `g.core`. A route
  with an `agent_id` in its URL answers 404 here, before its body is read, unless the caller
  has an agent of that id (another source's agent is answered exactly like a missing one).
- `admin`: HTTP Basic credentials of an administrator account; 401 otherwise.
Failed administrator logins are rate limited per client address (429), checked one at a time
per address; every login attempt is written to the audit log (store/audit.py).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import trio
from quart import g, request

from . import runtime
from .errors import Forbidden, NotFound, TooManyRequests, Unauthorized
from .store import admins, agents, audit, cores

P = ParamSpec("P")
R = TypeVar("R")
Handler = Callable[P, Awaitable[R]]

log = logging.getLogger("replicore.auth")

ACCESS_ATTRIBUTE = "replicore_access"
FAILED_LOGINS_PER_WINDOW = 10
FAILED_LOGIN_WINDOW = 300.0


def client_fingerprint() -> str | None:
    tls = (request.scope.get("extensions") or {}).get("tls") or {}
    return tls.get("client_cert_fingerprint")


def client_address() -> str:
    client = request.scope.get("client")
    return str(client[0]) if client else ""


def _declare(level: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    def decorator(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        check = _CHECKS[level]

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            await check()
            return await fn(*args, **kwargs)

        setattr(wrapper, ACCESS_ATTRIBUTE, level)
        return wrapper

    return decorator


async def _anonymous() -> None:
    g.core = None


def _caller(
    conn: Any, fingerprint: str, agent_id: str | None
) -> tuple[dict[str, Any] | None, bool]:
    """The core row of a certificate, and whether it has an agent `agent_id` (one read)."""
    core = cores.by_fingerprint(conn, fingerprint)
    has_agent = (
        core is not None and agent_id is not None and bool(agents.get(conn, core["id"], agent_id))
    )
    return core, has_agent


async def _known_source(agent_id: str | None = None) -> tuple[dict[str, Any], bool]:
    fingerprint = client_fingerprint()
    if fingerprint is None:
        raise Unauthorized("a client certificate is required for this operation")
    core, has_agent = await runtime.current().db.read(_caller, fingerprint, agent_id)
    if core is None or core["state"] not in cores.TRUSTED_STATES:
        raise Unauthorized("this client certificate is not known to this core")
    g.core = core
    return core, has_agent


async def _paired_source() -> None:
    agent_id = (request.view_args or {}).get("agent_id")
    core, has_agent = await _known_source(agent_id)
    if core["state"] != "approved":
        raise Forbidden(
            f"the pairing of this certificate is {core['state']}, not approved",
            state=core["state"],
        )
    if agent_id is not None and not has_agent:
        raise NotFound(f"this source has no agent {agent_id!r} on this core", field="agentId")


def basic_credentials() -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


async def check_admin() -> str:
    """The administrator's name, or Unauthorized / TooManyRequests."""
    rt = runtime.current()
    limiter = rt.limiter("admin-login", FAILED_LOGINS_PER_WINDOW, FAILED_LOGIN_WINDOW)
    address = client_address()
    credentials = basic_credentials()
    if credentials is None:
        raise Unauthorized(
            "administrator credentials are required (HTTP Basic)",
            www_authenticate='Basic realm="replicore"',
        )
    user, password = credentials
    # One check at a time per address: parallel guesses would all pass `blocked` before the
    # first failure is recorded.
    async with _login_lock(rt, address):
        if limiter.blocked(address):
            # One row per address and window: a flood of refused attempts must not fill the disk.
            if rt.limiter("admin-login-refused-audit", 1, FAILED_LOGIN_WINDOW).allow(address):
                await _audit_login(user, "refused", address)
            raise TooManyRequests(
                "too many failed administrator logins from this address",
                retry_after=limiter.retry_after(address),
            )
        if not await rt.db.read(admins.check, user, password):
            limiter.record(address)
            await _audit_login(user, "failed", address)
            raise Unauthorized(
                "bad administrator credentials", www_authenticate='Basic realm="replicore"'
            )
    await _audit_login(user, "ok", address)
    return user


@contextlib.asynccontextmanager
async def _login_lock(rt: runtime.Runtime, address: str) -> AsyncIterator[None]:
    locks: dict[str, trio.Lock] = rt.extras.setdefault("admin-login-locks", {})
    lock = locks.setdefault(address, trio.Lock())
    try:
        async with lock:
            yield
    finally:
        if not lock.locked() and lock.statistics().tasks_waiting == 0:
            locks.pop(address, None)


async def _audit_login(user: str, outcome: str, address: str) -> None:
    """Write the audit row of an administrator login (never the password); a failure to
    write it is logged and does not change the answer."""
    details = {"method": request.method, "path": request.path[: audit.MAX_TEXT]}
    try:
        await runtime.current().db.write(
            audit.record,
            f"api:{user}",
            "admin.login",
            outcome=outcome,
            client_address=address,
            details=details,
        )
    except Exception:
        log.exception("could not write the audit row of an administrator login")


async def _admin() -> None:
    g.admin = await check_admin()


_CHECKS: dict[str, Callable[[], Awaitable[Any]]] = {
    "anonymous": _anonymous,
    "known_source": _known_source,
    "paired_source": _paired_source,
    "admin": _admin,
}

anonymous = _declare("anonymous")
known_source = _declare("known_source")
paired_source = _declare("paired_source")
admin = _declare("admin")
