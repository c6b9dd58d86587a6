"""The daemon's logs: one JSON object per line on stderr, for journald and log shippers.

Every line has `ts` (UTC, ISO 8601, milliseconds), `level`, `logger` and `msg`, then what is
known of the request it belongs to: `request_id`, `source_core_id`, `agent_id`,
`session_id` (context variables set by the app for each request, so lines written anywhere
below a handler, threads included, carry them), then any `extra={"data": {...}}` fields, and
`exc` with the traceback of a logged exception.

Never logged: passwords, keys, Authorization headers. Our code does not pass them to a
logger; as a second line of defence `redact()` blanks fields named like secrets and masks
HTTP Basic/Bearer credentials and PEM private keys in any message.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any, TextIO

#: Context fields, in the order they appear in a line.
CONTEXT_FIELDS = ("request_id", "source_core_id", "agent_id", "session_id")

_context: dict[str, contextvars.ContextVar[str | None]] = {
    name: contextvars.ContextVar(f"replicore_log_{name}", default=None) for name in CONTEXT_FIELDS
}

_SECRET_NAME = re.compile(
    r"pass(word|wd|phrase)?|secret|token|authorization|credential|private_?key|api_?key",
    re.IGNORECASE,
)
_SECRET_TEXT = [
    (
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S
        ),
        "[private key redacted]",
    ),
    (
        re.compile(r"\b(Basic|Bearer|Digest)\s+[A-Za-z0-9+/=._~-]{4,}", re.IGNORECASE),
        r"\1 [redacted]",
    ),
    (re.compile(r"(pass(?:word|wd)?\s*[=:]\s*)\S+", re.IGNORECASE), r"\1[redacted]"),
]
REDACTED = "[redacted]"


def bind(**fields: str | None) -> None:
    """Set context fields (request_id, source_core_id, agent_id, session_id) for the
    current task and whatever it starts from now on."""
    for name, value in fields.items():
        _context[name].set(value)


@contextlib.contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Context fields for the duration of a block."""
    tokens = {name: _context[name].set(value) for name, value in fields.items()}
    try:
        yield
    finally:
        for name, token in tokens.items():
            _context[name].reset(token)


def context() -> dict[str, str]:
    """The context fields set in this task (only those that are set)."""
    found = {name: var.get() for name, var in _context.items()}
    if found["source_core_id"] is None:
        found["source_core_id"] = _caller_core_id()
    return {name: value for name, value in found.items() if value}


def _caller_core_id() -> str | None:
    """The paired source of the current request, once the auth check has put it in `g`."""
    try:
        from quart import g, has_app_context
    except ImportError:  # pragma: no cover - quart is a dependency
        return None
    if not has_app_context():
        return None
    core = g.get("core")
    return str(core["core_id"]) if isinstance(core, dict) and core.get("core_id") else None


def redact(value: Any, name: str = "") -> Any:
    """A copy of value with secret-named fields blanked and secrets masked in strings."""
    if name and _SECRET_NAME.search(name):
        return REDACTED
    if isinstance(value, str):
        for pattern, replacement in _SECRET_TEXT:
            value = pattern.sub(replacement, value)
        return value
    if isinstance(value, dict):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per record, keys in a fixed order."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        line.update(context())
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            for key, value in redact(data).items():
                line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        elif record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def setup(level: str = "info", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record of the process as JSON lines to stderr at `level`; replaces
    any handler installed before (the daemon calls this once, and again on reload)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "replicore_json", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.replicore_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    set_level(level)
    logging.captureWarnings(True)
    return handler


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
