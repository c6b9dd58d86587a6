"""Logins, sessions and CSRF tokens of the console.

- A session is a random token in a cookie (Secure, HttpOnly, SameSite=Strict, Path = the
  console's path, Max-Age = `console.session_ttl`); the database keeps only its SHA-256
  (store/console_sessions.py), with its absolute and idle expiry.
- The CSRF token of a session is HMAC-SHA256(session token, a fixed label): a page carries it
  in every form, and every POST must send it back; it is never stored.
- The login form itself is protected by a double-submit token: a short-lived random cookie
  whose value the form repeats.
- Logins use the administrator accounts (store/admins.py) and the API's failed-login limit:
  the same per-address limiter (`auth.FAILED_LOGINS_PER_WINDOW` per
  `auth.FAILED_LOGIN_WINDOW`, shared with HTTP Basic logins of the API) and the same per-address
  lock, so guesses spread over the API and the console count together. Each attempt is an
  `admin.login` row of the audit log with actor `console:NAME`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass

from quart import Response, request

from .. import auth, runtime
from ..config import ConsoleConfig
from ..store import admins, audit, console_sessions

log = logging.getLogger("replicore.console")

#: The session's last use is written at most this often (seconds): the idle timeout is
#: counted from that write.
TOUCH_EVERY = 30.0
#: Seconds the login form's token stays valid.
LOGIN_TOKEN_TTL = 3600
#: Longest cookie value looked at (ours are 43 characters).
MAX_TOKEN = 128
_CSRF_LABEL = b"replicore-console-csrf"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def csrf_for(token: str) -> str:
    return hmac.new(token.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def login_cookie_name(config: ConsoleConfig) -> str:
    return f"{config.cookie_name}_login"


def _cookie(response: Response, name: str, value: str, max_age: int, path: str) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=path, secure=True, httponly=True, samesite="Strict"
    )


def set_session_cookie(response: Response, config: ConsoleConfig, token: str) -> None:
    _cookie(response, config.cookie_name, token, int(config.session_ttl), config.path)


def clear_session_cookie(response: Response, config: ConsoleConfig) -> None:
    _cookie(response, config.cookie_name, "", 0, config.path)


def set_login_cookie(response: Response, config: ConsoleConfig, token: str) -> None:
    _cookie(response, login_cookie_name(config), token, LOGIN_TOKEN_TTL, config.path)


def clear_login_cookie(response: Response, config: ConsoleConfig) -> None:
    _cookie(response, login_cookie_name(config), "", 0, config.path)


@dataclass(frozen=True)
class Session:
    id: int
    admin: str
    token: str
    csrf: str
    created_at: float
    expires_at: float


async def current_session() -> Session | None:
    """The valid session of this request's cookie, or None; notes its use."""
    rt = runtime.current()
    config = rt.config.console
    token = request.cookies.get(config.cookie_name, "")
    if not token or len(token) > MAX_TOKEN:
        return None
    now = time.time()
    found = await rt.db.read(console_sessions.find, token_hash(token), now, config.idle_timeout)
    if found is None:
        return None
    if now - found["last_seen_at"] >= TOUCH_EVERY:
        await rt.db.write(console_sessions.touch, found["id"], now)
    return Session(
        found["id"],
        found["admin_name"],
        token,
        csrf_for(token),
        found["created_at"],
        found["expires_at"],
    )


async def start_session(admin: str) -> str:
    """A new session for `admin`; returns its token (for the cookie)."""
    rt = runtime.current()
    config = rt.config.console
    token = new_token()
    await rt.db.write(
        console_sessions.create,
        token_hash(token),
        admin,
        client_address=auth.client_address(),
        user_agent=request.headers.get("User-Agent", ""),
        now=time.time(),
        ttl=config.session_ttl,
        idle_timeout=config.idle_timeout,
    )
    return token


async def end_session(session: Session) -> None:
    await runtime.current().db.write(console_sessions.end, token_hash(session.token))


class LoginRefused(Exception):
    """A login that did not succeed: `status` 401 (bad credentials) or 429 (rate limited)."""

    def __init__(self, status: int, message: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


async def check_login(user: str, password: str) -> str:
    """The administrator's name when `user`/`password` is a valid login; LoginRefused
    otherwise. Same limiter, lock and audit rows as the API's HTTP Basic logins."""
    rt = runtime.current()
    limiter = rt.limiter("admin-login", auth.FAILED_LOGINS_PER_WINDOW, auth.FAILED_LOGIN_WINDOW)
    address = auth.client_address()
    async with auth._login_lock(rt, address):
        if limiter.blocked(address):
            if rt.limiter("admin-login-refused-audit", 1, auth.FAILED_LOGIN_WINDOW).allow(address):
                await audit_login(user, "refused", address)
            raise LoginRefused(
                429,
                "Too many failed logins from this address. Try again later.",
                limiter.retry_after(address),
            )
        if not user or not await rt.db.read(admins.check, user, password):
            limiter.record(address)
            await audit_login(user, "failed", address)
            raise LoginRefused(401, "Wrong administrator name or password.")
    await audit_login(user, "ok", address)
    return user


async def audit_login(user: str, outcome: str, address: str) -> None:
    """The audit row of a console login (never the password)."""
    await _audit(user, "admin.login", outcome, address)


async def audit_logout(user: str, address: str) -> None:
    await _audit(user, "admin.logout", "ok", address)


async def _audit(user: str, action: str, outcome: str, address: str) -> None:
    """A failure to write the row is logged and does not change the answer."""
    try:
        await runtime.current().db.write(
            audit.record,
            f"console:{user}",
            action,
            outcome=outcome,
            client_address=address,
            details={"via": "console"},
        )
    except Exception:
        log.exception("could not write the audit row of a console %s", action)


def safe_next(target: str | None, config: ConsoleConfig) -> str | None:
    """`target` when it is a path inside the console (where to go after logging in)."""
    if not target or len(target) > 512:
        return None
    if not target.startswith(config.path + "/") or "//" in target or "\\" in target:
        return None
    return target
