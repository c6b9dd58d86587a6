"""Login and logout pages of the console (see security.py for how sessions and limits work)."""

from __future__ import annotations

from quart import Response, g, redirect, render_template, request, url_for

from .. import runtime
from . import security
from .web import bp, forget_notices, who


async def _login_form(
    status: int = 200,
    error: str = "",
    user: str = "",
    retry_after: int = 0,
    next_target: str | None = None,
) -> Response:
    config = runtime.current().config.console
    if next_target is None:
        next_target = request.args.get("next")
    token = security.new_token()
    html = await render_template(
        "console/login.html",
        login_token=token,
        error=error,
        user=user,
        next=security.safe_next(next_target, config) or "",
        expired=request.args.get("expired") == "1",
    )
    response = Response(html, status=status, content_type="text/html; charset=utf-8")
    security.set_login_cookie(response, config, token)
    if retry_after:
        response.headers["Retry-After"] = str(retry_after)
    return response


@bp.get("/login")
async def login() -> Response:
    """The login form (a logged-in operator goes to the dashboard)."""
    if await security.current_session() is not None:
        return redirect(url_for("console.dashboard"), 303)
    return await _login_form()


@bp.post("/login")
async def login_post() -> Response:
    """Check the administrator's name and password; start a session."""
    config = runtime.current().config.console
    form = await request.form
    cookie = request.cookies.get(security.login_cookie_name(config), "")
    next_target = str(form.get("next", ""))
    if not cookie or not security.same(form.get("login_token"), cookie):
        return await _login_form(
            403,
            "The login form expired or came from elsewhere. Please try again.",
            next_target=next_target,
        )
    user = str(form.get("user", "")).strip()[:64]
    password = str(form.get("password", ""))[:1024]
    try:
        admin = await security.check_login(user, password)
    except security.LoginRefused as refused:
        return await _login_form(
            refused.status, refused.message, user, refused.retry_after, next_target
        )
    token = await security.start_session(admin)
    target = security.safe_next(next_target, config)
    response = redirect(target or url_for("console.dashboard"), 303)
    security.set_session_cookie(response, config, token)
    security.clear_login_cookie(response, config)
    return response


@bp.post("/logout")
async def logout() -> Response:
    """End the session (the gate has checked it and its CSRF token)."""
    config = runtime.current().config.console
    session: security.Session = g.console_session
    operator = who()
    await security.end_session(session)
    forget_notices(session)
    await security.audit_logout(operator.admin, operator.address)
    response = redirect(url_for("console.login"), 303)
    security.clear_session_cookie(response, config)
    return response
