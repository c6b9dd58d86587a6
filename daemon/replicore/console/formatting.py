"""Jinja filters of the console's templates: sizes, times, ratios, shell commands."""

from __future__ import annotations

import json
import shlex
import time
from datetime import UTC, datetime
from typing import Any

from quart import Blueprint

from .. import __version__

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n: int | float | None) -> str:
    """Bytes in powers of 1024: '512 B', '1.5 GiB'; '-' for None."""
    if n is None:
        return "-"
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{int(value)} B"
    return f"{value:.1f} {_UNITS[unit]}"


def when(value: float | str | None) -> str:
    """A time in UTC, to the minute; '-' for none. ISO strings are shown as given."""
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M UTC")


def when_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return f"{seconds} s"


def ago(value: float | None, now: float | None = None) -> str:
    """'5 min ago', 'in 3 d 2 h'; '-' for none."""
    if value is None:
        return "-"
    delta = (time.time() if now is None else now) - value
    if abs(delta) < 5:
        return "just now"
    return f"{duration(delta)} ago" if delta > 0 else f"in {duration(-delta)}"


def ratio(value: float | None) -> str:
    return "-" if not value else f"{value:.2f}:1"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def command(words: list[str]) -> str:
    """A command line, each word quoted for a POSIX shell where needed."""
    return " ".join(shlex.quote(str(w)) for w in words)


def compact_json(value: Any) -> str:
    if not value:
        return ""
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), default=str)


def register(bp: Blueprint) -> None:
    for name, fn in (
        ("size", size),
        ("when", when),
        ("when_seconds", when_seconds),
        ("ago", ago),
        ("ratio", ratio),
        ("percent", percent),
        ("command", command),
        ("compact_json", compact_json),
        ("duration", duration),
    ):
        bp.add_app_template_filter(fn, f"console_{name}")

    @bp.context_processor
    async def version() -> dict[str, Any]:
        return {"replicore_version": __version__}
