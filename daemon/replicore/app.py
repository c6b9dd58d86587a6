"""The QuartTrio application: blueprints under the URL prefix, JSON errors, request limits.

Every error leaves as JSON `{"error", "message", "field"?}`: our `ApiError`s with their own
status, Werkzeug/Quart HTTP errors (404 route, 405, 413) with theirs, anything else as 500
without internals.

Around the app, `ObservedApp` gives each request an id (`X-Request-Id`, the client's if it
sends a sane one), binds the log context (request id, then agent and session ids from the
route, the caller's core id once authorized), measures latency by route rule until the last
response byte, and writes one access-log line per request.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import trio
from quart import Response, g, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import console, logs, metrics, request_body, server
from .api import BLUEPRINTS
from .errors import ApiError
from .runtime import Runtime

log = logging.getLogger("replicore.app")
access_log = logging.getLogger("replicore.access")

API_ROOT = "/replicationcomms"


def create_app(runtime: Runtime) -> QuartTrio:
    app = QuartTrio("replicore", static_folder=None, template_folder=None)
    app.request_class = request_body.Request
    app.config["MAX_CONTENT_LENGTH"] = runtime.config.server.max_request_bytes
    app.config["BODY_TIMEOUT"] = 120
    app.config["RESPONSE_TIMEOUT"] = 600
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["replicore"] = runtime
    prefix = runtime.config.server.url_prefix + API_ROOT
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint, url_prefix=prefix)
    if runtime.config.console.enabled:
        # The console brings its own template and static folders (the app has none).
        app.register_blueprint(console.bp, url_prefix=runtime.config.console.path)

    rule_prefix = prefix + "/"

    @app.before_request
    async def bind_request_context() -> None:
        state = request.scope.get(STATE_KEY)
        if state is None:
            return
        rule = request.url_rule.rule if request.url_rule is not None else None
        if rule is not None:
            state["endpoint"] = rule.removeprefix(rule_prefix)
        view_args = request.view_args or {}
        for field, names in _ROUTE_IDS.items():
            found = next((view_args[n] for n in names if view_args.get(n) is not None), None)
            if found is not None:
                state[field] = str(found)
                logs.bind(**{field: str(found)})

    @app.after_request
    async def note_caller(response: Response) -> Response:
        state = request.scope.get(STATE_KEY)
        core = g.get("core")
        if state is not None and isinstance(core, dict) and core.get("core_id"):
            state["source_core_id"] = str(core["core_id"])
        return response

    app.asgi_app = ObservedApp(  # type: ignore[method-assign]
        BulkGate(app.asgi_app, runtime.config.server.max_bulk_requests)
    )

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        return _json_error(error.status, error.body())

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        code = (error.name or "error").lower().replace(" ", "_")
        return _json_error(error.code or 500, {"error": code, "message": error.description})

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unhandled error: %s", error)
        return _json_error(500, {"error": "internal_error", "message": "internal error"})

    return app


def _json_error(status: int, body: dict[str, Any]) -> Response:
    headers = {}
    if "www_authenticate" in body:
        headers["WWW-Authenticate"] = body.pop("www_authenticate")
    if "retry_after" in body:
        headers["Retry-After"] = str(body["retry_after"])
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers)
    return response


#: Route parameters that name the agent or session of a request, for the log context.
_ROUTE_IDS = {
    "agent_id": ("agent_id", "agentId"),
    "session_id": ("session_id", "sessionId", "upload_session_id", "uploadSessionId"),
}
#: Where the middleware and the Quart hooks share what they know of one request.
STATE_KEY = "replicore.request"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class BulkGate:
    """ASGI middleware: at most `limit` bulk bodies (record batches, o3edata, upload chunks)
    in the app at once. Quart buffers a request's body as soon as the app is called, with no
    backpressure, so a waiting bulk request is held here, before the app, where Hypercorn's
    small receive queue and TCP hold its bytes back instead of memory. An admitted body's
    connection reads `server.BULK_READ_SIZE` at a time until it is done."""

    BULK_PATH = re.compile(r"/(?:records/rawdata|o3edata)$|/sessions/[^/]+/data/\d+$")

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.slots = trio.Semaphore(limit)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.BULK_PATH.search(scope["path"]):
            await self.app(scope, receive, send)
            return
        async with self.slots:
            read_size = (scope.get("extensions") or {}).get(server.READ_SIZE_KEY)
            if read_size is not None:
                read_size.bytes = server.BULK_READ_SIZE
            try:
                await self.app(scope, receive, send)
            finally:
                if read_size is not None:
                    read_size.bytes = server.SOCKET_READ_SIZE


class ObservedApp:
    """ASGI middleware: request id, log context, latency metric and access log."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                request_id = candidate if _REQUEST_ID.match(candidate) else ""
        request_id = request_id or uuid.uuid4().hex[:16]
        state: dict[str, Any] = {"endpoint": metrics.UNMATCHED}
        scope = {**scope, STATE_KEY: state}
        status = 0
        sent = 0
        done = False
        start = time.perf_counter()

        def finish() -> None:
            nonlocal done
            if done:
                return
            done = True
            seconds = time.perf_counter() - start
            metrics.observe_request(state["endpoint"], scope["method"], status, seconds)
            self._log(scope, state, status, sent, seconds)

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers") or [])
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body") or b"")
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finish()

        logs.bind(request_id=request_id)
        metrics.REQUESTS_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            metrics.REQUESTS_IN_FLIGHT.dec()
            finish()  # a request cut before its last byte counts with what it had sent

    @staticmethod
    def _log(scope: Any, state: dict[str, Any], status: int, sent: int, seconds: float) -> None:
        client = scope.get("client")
        fields = {
            k: state.get(k) for k in ("source_core_id", "agent_id", "session_id") if state.get(k)
        }
        with logs.bound(**fields):
            access_log.info(
                "%s %s %s %.1f ms",
                scope["method"],
                scope["path"],
                status or "cut",
                seconds * 1000,
                extra={
                    "data": {
                        "method": scope["method"],
                        "path": scope["path"],
                        "endpoint": state["endpoint"],
                        "status": status,
                        "duration_ms": round(seconds * 1000, 3),
                        "response_bytes": sent,
                        "client": client[0] if client else "",
                    }
                },
            )
