"""The console's blueprint and what every page shares: the login gate, the CSRF check, the
security headers, HTML error pages, one-shot notices, and the runner of operator actions.

The gate (`before_request`) lets through only the login page, its form and the stylesheet;
any other GET without a valid session is sent to the login page, any other POST without one
is refused (403). Every POST of a logged-in operator must carry the session's CSRF token in
the form field `csrf` (403 otherwise) and, when the browser sends an Origin header, come
from this very origin.

An action (`act`) is one `Database.write` of a plain function that calls the same
store functions as the matching `replicore` command and writes its audit row (actor
`console:NAME`, the client address) in the same transaction; a refused action (an ApiError:
conflict, not found, bad input) changes nothing, is written to the audit log as failed, and
comes back as an error notice. Every action answers 303 to a page (post/redirect/get).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit

import apsw
from quart import Blueprint, Response, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from .. import auth, runtime
from ..errors import ApiError
from ..store import audit, cores
from . import formatting, security

log = logging.getLogger("replicore.console")

P = ParamSpec("P")
T = TypeVar("T")

bp = Blueprint(
    "console",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
formatting.register(bp)

#: Endpoints reachable without a session (the stylesheet is checked by file name).
PUBLIC_ENDPOINTS = frozenset({"console.login", "console.login_post"})
PUBLIC_STATIC = frozenset({"console.css"})
#: Longest text an operator may type into a form field.
MAX_FIELD = 1000

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
    " frame-ancestors 'none'; base-uri 'none'"
)
NAV = (
    ("console.dashboard", "Dashboard"),
    ("console.pairing", "Pairing requests"),
    ("console.sources", "Sources"),
    ("console.agents", "Agents"),
    ("console.recycle_bin", "Recycle bin"),
    ("console.jobs", "Jobs"),
    ("console.audit_log", "Audit log"),
    ("console.billing", "Billing"),
)
#: Pages that belong to a section of the navigation other than their own endpoint.
SECTIONS = {"console.agent": "console.agents", "console.bin_entry": "console.recycle_bin"}
_FLASH_KEY = "console.flash"


class FormError(ValueError):
    """A form field an operator filled in wrongly; the message names it."""


@dataclass(frozen=True)
class Who:
    """The operator behind an action, as the audit log and `decided_by` record them."""

    admin: str
    address: str

    @property
    def actor(self) -> str:
        return f"console:{self.admin}"


def who() -> Who:
    return Who(g.console_session.admin, auth.client_address())


# --------------------------------------------------------------------------
# The gate, headers, errors
# --------------------------------------------------------------------------


@bp.before_request
async def gate() -> Response | None:
    endpoint = request.endpoint or ""
    if endpoint == "console.static":
        if (request.view_args or {}).get("filename") in PUBLIC_STATIC:
            return None
    elif endpoint in PUBLIC_ENDPOINTS:
        return None
    session = await security.current_session()
    if session is None:
        if request.method in ("GET", "HEAD"):
            return redirect(url_for("console.login", next=request.full_path.rstrip("?")), 303)
        return await error_page(403, "Not logged in", "Log in to the console first.")
    g.console_session = session
    if request.method == "POST":
        form = await request.form
        if not security.same(form.get("csrf"), session.csrf):
            log.warning("console: POST %s refused, missing or wrong CSRF token", request.path)
            return await error_page(
                403,
                "Form refused",
                "The form's security token is missing or wrong. Reload the page and try again.",
            )
        if not same_origin():
            return await error_page(403, "Form refused", "The form came from another site.")
    return None


def same_origin() -> bool:
    """True unless the browser names an Origin other than this server."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme == "https" and parts.netloc == request.host


@bp.after_request
async def headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"
    return response


async def error_page(status: int, title: str, message: str) -> Response:
    logged_in = g.get("console_session") is not None
    html = await render_template(
        "console/error.html", status=status, title=title, message=message, logged_in=logged_in
    )
    return Response(html, status=status, content_type="text/html; charset=utf-8")


_TITLES = {404: "Not found", 409: "Not possible now", 422: "Not accepted", 507: "No space left"}


@bp.errorhandler(ApiError)
async def api_error(error: ApiError) -> Response:
    return await error_page(error.status, _TITLES.get(error.status, "Not possible"), error.message)


@bp.route("/<path:rest>", methods=["GET", "POST"])
async def not_found(rest: str) -> Response:
    """Any other path under the console: behind the gate like every page, then 404."""
    return await error_page(404, "Not found", "There is no such page in the console.")


@bp.errorhandler(HTTPException)
async def http_error(error: HTTPException) -> Response:
    return await error_page(error.code or 500, error.name, error.description or "")


@bp.errorhandler(Exception)
async def unexpected(error: Exception) -> Response:
    log.exception("console: unhandled error: %s", error)
    return await error_page(500, "Internal error", "Something went wrong; see the daemon's log.")


# --------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------


def _notices() -> dict[tuple[int, float], list[tuple[str, str]]]:
    found: dict[tuple[int, float], list[tuple[str, str]]] = runtime.current().extras.setdefault(
        _FLASH_KEY, {}
    )
    return found


def _key(session: security.Session) -> tuple[int, float]:
    # Row ids may be reused once a session is deleted; with its start time the key is not.
    return (session.id, session.created_at)


def flash(kind: str, text: str) -> None:
    """A notice shown once, on the next page this session renders."""
    _notices().setdefault(_key(g.console_session), []).append((kind, text))


def take_notices() -> list[tuple[str, str]]:
    return _notices().pop(_key(g.console_session), [])


def forget_notices(session: security.Session) -> None:
    _notices().pop(_key(session), None)


async def page(template: str, *, title: str, refresh: int | None = None, **context: Any) -> str:
    """Render a page of the logged-in console (layout, navigation, notices, CSRF token)."""
    session: security.Session = g.console_session
    pending = await runtime.current().db.read(_pending_count)
    return await render_template(
        f"console/{template}",
        title=title,
        nav=NAV,
        me=session,
        csrf=session.csrf,
        section=SECTIONS.get(request.endpoint or "", request.endpoint),
        notices=take_notices(),
        pending_requests=pending,
        refresh=refresh,
        now=time.time(),
        console_path=runtime.current().config.console.path,
        **context,
    )


def _pending_count(conn: apsw.Connection) -> int:
    return len(cores.list_requests(conn))


def field(form: Any, name: str, label: str, *, limit: int = MAX_FIELD) -> str:
    value = str(form.get(name, "")).strip()
    if len(value) > limit:
        raise FormError(f"{label}: at most {limit} characters")
    return value


# --------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------


async def refused(action: str, target: str, message: str) -> None:
    """The audit row of an action the store refused (the action changed nothing)."""
    operator = who()
    try:
        await runtime.current().db.write(
            audit.record,
            operator.actor,
            action,
            target,
            outcome="failed",
            client_address=operator.address,
            details={"error": message},
        )
    except Exception:
        log.exception("could not write the audit row of a refused console action")


async def act(
    action: str,
    target: str,
    fn: Callable[Concatenate[apsw.Connection, Who, P], T],
    done: Callable[[T], str],
    back: str,
    *args: P.args,
    **kwargs: P.kwargs,
) -> Response:
    """Run an action (see the module docstring) and redirect to `back` with its notice."""
    rt = runtime.current()
    try:
        result = await rt.db.write(fn, who(), *args, **kwargs)
    except ApiError as error:
        await refused(action, target, error.message)
        flash("error", error.message)
    else:
        flash("ok", done(result))
    return redirect(back, 303)


async def form_refused(message: str, back: str) -> Response:
    flash("error", message)
    return redirect(back, 303)
