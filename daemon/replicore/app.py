"""The QuartTrio application: blueprints under the URL prefix, JSON errors, request limits.

Every error leaves as JSON `{"error", "message", "field"?}`: our `ApiError`s with their own
status, Werkzeug/Quart HTTP errors (404 route, 405, 413) with theirs, anything else as 500
without internals.
"""

from __future__ import annotations

import logging
from typing import Any

from quart import Response, jsonify
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .api import BLUEPRINTS
from .errors import ApiError
from .runtime import Runtime

log = logging.getLogger("replicore.app")

API_ROOT = "/replicationcomms"


def create_app(runtime: Runtime) -> QuartTrio:
    app = QuartTrio("replicore", static_folder=None, template_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = runtime.config.server.max_request_bytes
    app.config["BODY_TIMEOUT"] = 120
    app.config["RESPONSE_TIMEOUT"] = 600
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["replicore"] = runtime
    prefix = runtime.config.server.url_prefix + API_ROOT
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint, url_prefix=prefix)

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
