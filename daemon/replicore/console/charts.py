"""A line chart drawn on the server as SVG geometry (no JavaScript): stored bytes per customer
over time. `line_chart` turns series of (time, bytes) into coordinates, axis ticks and a
legend; the template writes them as `<svg>` elements (escaped by Jinja like any text)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .formatting import size

PALETTE = (
    "#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed",
    "#0891b2", "#db2777", "#4b5563", "#65a30d", "#9333ea",
)  # fmt: skip
#: Points drawn per series at most (later samples in a bucket win).
MAX_POINTS = 240
_TIME_STEPS = (
    3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 86400.0, 2 * 86400.0,
    7 * 86400.0, 14 * 86400.0, 30 * 86400.0, 91 * 86400.0, 182 * 86400.0, 365 * 86400.0,
)  # fmt: skip


@dataclass
class Line:
    label: str
    color: str
    points: str
    last: float
    dots: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Chart:
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    lines: list[Line] = field(default_factory=list)
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    empty: bool = True


def downsample(points: list[list[float]], since: float, until: float) -> list[list[float]]:
    """At most MAX_POINTS + 1 points: the last of each of MAX_POINTS equal time buckets (what
    the chart's resolution can show; samples taken seconds apart collapse into one)."""
    span = (until - since) / MAX_POINTS or 1.0
    buckets: dict[int, list[float]] = {}
    for point in points:
        buckets[int((point[0] - since) / span)] = point
    return [buckets[k] for k in sorted(buckets)]


def nice_step(maximum: float, ticks: int = 5) -> float:
    """A step of 1, 2 or 5 times a power of 1024-based units covering `maximum` in ~ticks."""
    if maximum <= 0:
        return 1.0
    unit = 1024 ** max(0, int(math.log(maximum, 1024)))
    raw = maximum / unit / ticks
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude * unit
    return 10 * magnitude * unit


def _time_label(moment: float, step: float) -> str:
    when = datetime.fromtimestamp(moment, UTC)
    if step < 86400:
        return when.strftime("%d %b %H:%M")
    if step < 30 * 86400:
        return when.strftime("%d %b")
    return when.strftime("%b %Y")


def line_chart(
    series: dict[str, list[list[float]]],
    since: float,
    until: float,
    width: int = 760,
    height: int = 260,
) -> Chart:
    chart = Chart(width, height, left=76, right=width - 16, top=14, bottom=height - 30)
    values = [p[1] for points in series.values() for p in points]
    chart.empty = not values
    top_value = max(values, default=0.0)
    step = nice_step(top_value)
    y_max = step * max(1, math.ceil(top_value / step)) if top_value > 0 else step
    plot_w, plot_h = chart.right - chart.left, chart.bottom - chart.top
    span = max(until - since, 1.0)

    def x(at: float) -> float:
        return round(chart.left + (at - since) / span * plot_w, 1)

    def y(value: float) -> float:
        return round(chart.bottom - value / y_max * plot_h, 1)

    tick = 0.0
    while tick <= y_max + step / 2:
        chart.y_ticks.append((y(tick), size(tick).replace(".0 ", " ") if tick else "0"))
        tick += step
    time_step = next((s for s in _TIME_STEPS if span / s <= 7), _TIME_STEPS[-1])
    first = math.ceil(since / time_step) * time_step
    moment = first
    while moment <= until:
        chart.x_ticks.append((x(moment), _time_label(moment, time_step)))
        moment += time_step
    for index, (label, points) in enumerate(series.items()):
        drawn = downsample(points, since, until)
        coords = [(x(at), y(value)) for at, value in drawn]
        chart.lines.append(
            Line(
                label=label,
                color=PALETTE[index % len(PALETTE)],
                points=" ".join(f"{cx},{cy}" for cx, cy in coords),
                last=drawn[-1][1] if drawn else 0.0,
                dots=coords if len(coords) <= 40 else coords[-1:],
            )
        )
    return chart
