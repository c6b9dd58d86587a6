"""Billing: the monthly report of store/billing.py as a table (per customer, source and agent)
with its CSV download (the columns of `replicore billing report --format csv`), and a chart
of the bytes each customer stores here over time (samples of store/usage_history.py, taken
by sampler.py, plus the value now)."""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime
from typing import Any

import apsw
from quart import Response, request

from .. import runtime
from ..errors import Unprocessable
from ..store import billing as billing_store
from ..store import usage_history
from . import charts
from .web import bp, page

#: Chart periods offered, in days.
RANGES = (7, 30, 90, 365)
DEFAULT_RANGE = 30
DAY = 86400.0


def _month(now: float) -> str:
    month = request.args.get("month") or billing_store.current_month(now)
    try:
        start, _ = billing_store.month_bounds(month)
    except ValueError as error:
        raise Unprocessable(f"month: {error}", field="month") from None
    if start > now:
        raise Unprocessable(f"month: {month} has not begun", field="month")
    return month


def recent_months(now: float, count: int = 12) -> list[str]:
    moment = datetime.fromtimestamp(now, UTC)
    year, month = moment.year, moment.month
    found = []
    for _ in range(count):
        found.append(f"{year:04d}-{month:02d}")
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    return found


def _cli_billing() -> Any:
    """`replicore billing report`'s module, for its CSV columns and rows (imported when first
    needed: the cli package imports the app, which imports the console)."""
    from ..cli import billing as cli_billing

    return cli_billing


def _billing(conn: apsw.Connection, month: str, days: int, now: float) -> dict[str, Any]:
    report = billing_store.report(conn, month, now)
    series = usage_history.per_customer(conn, now - days * DAY, now)
    live: dict[str, float] = {}
    for source in report["sources"]:
        label = usage_history.customer_label(
            source["customerId"], source["hostName"], source["coreId"]
        )
        live[label] = live.get(label, 0.0) + source["totals"]["storedBytes"]
    for label, value in live.items():
        series.setdefault(label, []).append([now, value])
    return {
        "report": report,
        "rows": _cli_billing().flat_rows(report),
        "series": dict(sorted(series.items())),
        "last_sample": usage_history.last_sample_at(conn),
    }


@bp.get("/billing")
async def billing() -> str:
    now = time.time()
    month = _month(now)
    try:
        days = int(request.args.get("days", DEFAULT_RANGE))
    except ValueError:
        days = DEFAULT_RANGE
    if days not in RANGES:
        days = DEFAULT_RANGE
    data = await runtime.current().db.read(_billing, month, days, now)
    chart = charts.line_chart(data["series"], now - days * DAY, now)
    return await page(
        "billing.html",
        title="Billing",
        month=month,
        months=recent_months(now),
        days=days,
        ranges=RANGES,
        chart=chart,
        sample_interval=runtime.current().config.console.usage_sample_interval,
        **data,
    )


def csv_text(report: dict[str, Any]) -> str:
    """The report as `replicore billing report --format csv` prints it."""
    cli_billing = _cli_billing()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([name for name, _ in cli_billing.CSV_COLUMNS])
    for r in cli_billing.flat_rows(report):
        writer.writerow(["" if r[key] is None else r[key] for _, key in cli_billing.CSV_COLUMNS])
    return out.getvalue()


@bp.get("/billing.csv")
async def billing_csv() -> Response:
    now = time.time()
    month = _month(now)
    report = await runtime.current().db.read(billing_store.report, month, now)
    return Response(
        csv_text(report),
        content_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="replicore-billing-{month}.csv"'},
    )
