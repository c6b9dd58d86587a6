"""Prometheus metrics: the counters other modules bump, the gauges read from the database at
scrape time, and the plain-HTTP listener that serves them (`[metrics] listen`).

What the data path calls (cheap, synchronous, safe from any thread):
- `record_received(nbytes, records=1, raw_nbytes=None)`: records accepted (verified against
  their key) from a source; `nbytes` as sent (compressed), `raw_nbytes` uncompressed.
- `record_deduplicated(nbytes, records=1)`: blocks whose record the repository already had
  at key negotiation (not sent); `nbytes` uncompressed, as the key stream gives it.
- `record_rejected(nbytes, records=1, reason="mismatch")`: records refused.
- `session_opened()`, `session_committed()`, `session_discarded(reason)`.
- `with uploading():` around a request that streams records (uploads in progress).
- `register_count("sessions_open" | "jobs_running", fn)`: fn(conn) -> int, read at each
  scrape and by `replicore status`.

The app measures request latency by route rule (`observe_request`). Everything about the
database (repositories' used/free bytes, sources by state, pending requests, registered
counts) is read by `read_facts(conn, state_dir)` on each scrape, and also used by
`replicore status`. The registry is this module's own `REGISTRY`, not the global one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from . import __version__
from .store import repositories
from .store.db import rows

log = logging.getLogger("replicore.metrics")

prometheus_client.disable_created_metrics()  # *_created series only add noise here

REGISTRY = CollectorRegistry(auto_describe=True)

RECEIVED_BYTES = Counter(
    "replicore_received_bytes",
    "Bytes of records accepted from sources, as sent (compressed).",
    registry=REGISTRY,
)
RECEIVED_RAW_BYTES = Counter(
    "replicore_received_uncompressed_bytes",
    "Uncompressed bytes of the records accepted from sources.",
    registry=REGISTRY,
)
RECEIVED_RECORDS = Counter(
    "replicore_received_records", "Records accepted from sources.", registry=REGISTRY
)
DEDUPLICATED_BYTES = Counter(
    "replicore_deduplicated_bytes",
    "Uncompressed bytes of blocks not sent because the repository had their record.",
    registry=REGISTRY,
)
DEDUPLICATED_RECORDS = Counter(
    "replicore_deduplicated_records",
    "Blocks not sent because the repository already had their record.",
    registry=REGISTRY,
)
REJECTED_BYTES = Counter(
    "replicore_rejected_bytes",
    "Bytes of records refused (not matching their key, malformed, over quota).",
    ["reason"],
    registry=REGISTRY,
)
REJECTED_RECORDS = Counter(
    "replicore_rejected_records", "Records refused.", ["reason"], registry=REGISTRY
)
SESSIONS_OPENED = Counter(
    "replicore_sessions_opened", "Volume-image sessions opened.", registry=REGISTRY
)
SESSIONS_COMMITTED = Counter(
    "replicore_sessions_committed", "Volume-image sessions committed.", registry=REGISTRY
)
SESSIONS_DISCARDED = Counter(
    "replicore_sessions_discarded",
    "Volume-image sessions discarded (by the source, by timeout, after an error).",
    ["reason"],
    registry=REGISTRY,
)
UPLOADS_IN_PROGRESS = Gauge(
    "replicore_uploads_in_progress", "Requests streaming records right now.", registry=REGISTRY
)
REQUESTS_IN_FLIGHT = Gauge(
    "replicore_http_requests_in_flight", "API requests being handled now.", registry=REGISTRY
)
REQUEST_SECONDS = Histogram(
    "replicore_http_request_duration_seconds",
    "API request latency until the last response byte, by route rule and method.",
    ["endpoint", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
REQUESTS = Counter(
    "replicore_http_requests",
    "API requests answered, by route rule, method and status (0: connection cut).",
    ["endpoint", "method", "status"],
    registry=REGISTRY,
)
START_TIME = Gauge(
    "replicore_start_time_seconds", "When the daemon started (Unix time).", registry=REGISTRY
)

#: Label of requests that matched no route.
UNMATCHED = "(unmatched)"

CountFunction = Callable[[apsw.Connection], int]
#: Live work the database knows of, by name; each f(conn) -> int is registered by the store
#: module that owns that table. Known names: "sessions_open", "jobs_running".
COUNTS: dict[str, CountFunction] = {}
_lock = threading.Lock()


def record_received(nbytes: int, records: int = 1, raw_nbytes: int | None = None) -> None:
    RECEIVED_BYTES.inc(nbytes)
    RECEIVED_RECORDS.inc(records)
    if raw_nbytes is not None:
        RECEIVED_RAW_BYTES.inc(raw_nbytes)


def record_deduplicated(nbytes: int, records: int = 1) -> None:
    DEDUPLICATED_BYTES.inc(nbytes)
    DEDUPLICATED_RECORDS.inc(records)


def record_rejected(nbytes: int, records: int = 1, reason: str = "mismatch") -> None:
    REJECTED_BYTES.labels(reason).inc(nbytes)
    REJECTED_RECORDS.labels(reason).inc(records)


def session_opened() -> None:
    SESSIONS_OPENED.inc()


def session_committed() -> None:
    SESSIONS_COMMITTED.inc()


def session_discarded(reason: str = "source") -> None:
    SESSIONS_DISCARDED.labels(reason).inc()


@contextlib.contextmanager
def uploading() -> Iterator[None]:
    """Counts one record upload in progress for as long as the block runs."""
    UPLOADS_IN_PROGRESS.inc()
    try:
        yield
    finally:
        UPLOADS_IN_PROGRESS.dec()


def register_count(name: str, fn: CountFunction) -> None:
    with _lock:
        COUNTS[name] = fn


def observe_request(endpoint: str, method: str, status: int, seconds: float) -> None:
    REQUEST_SECONDS.labels(endpoint, method).observe(seconds)
    REQUESTS.labels(endpoint, method, str(status)).inc()


def live_value(gauge: Gauge) -> int:
    """The current value of one of this module's unlabelled gauges."""
    return int(gauge._value.get())


# --- what the database says, read at scrape time and by `replicore status` ---


@dataclass
class RepositoryUsage:
    name: str
    used_bytes: int
    quota_bytes: int | None
    #: What can still be stored: quota left and disk free, the smaller.
    free_bytes: int


@dataclass
class Facts:
    repositories: list[RepositoryUsage] = field(default_factory=list)
    sources_by_state: dict[str, int] = field(default_factory=dict)
    paired_sources: list[dict[str, Any]] = field(default_factory=list)
    pending_requests: list[dict[str, Any]] = field(default_factory=list)
    #: Registered counts ("sessions_open", "jobs_running"); absent when not registered.
    counts: dict[str, int] = field(default_factory=dict)
    disk_free_bytes: int = 0
    disk_size_bytes: int = 0
    database_bytes: int = 0


def disk_space(path: Path) -> tuple[int, int]:
    """(free for unprivileged writers, total) bytes of the filesystem holding path."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


def read_facts(conn: apsw.Connection, state_dir: Path, database_path: Path) -> Facts:
    facts = Facts()
    facts.disk_free_bytes, facts.disk_size_bytes = disk_space(state_dir)
    facts.database_bytes = sum(
        p.stat().st_size
        for p in (database_path, database_path.with_name(database_path.name + "-wal"))
        if p.exists()
    )
    for repo in repositories.list_all(conn):
        used, quota = int(repo["used_bytes"]), repo["quota_bytes"]
        free = facts.disk_free_bytes if quota is None else max(0, quota - used)
        facts.repositories.append(
            RepositoryUsage(repo["name"], used, quota, min(free, facts.disk_free_bytes))
        )
    for found in rows(conn, "SELECT state, count(*) AS n FROM master_cores GROUP BY state"):
        facts.sources_by_state[found["state"]] = int(found["n"])
    facts.paired_sources = rows(
        conn,
        "SELECT c.core_id, c.host_name, c.customer_id, c.method, c.fingerprint,"
        " c.last_contact_at, c.paused, r.name AS repository,"
        " (SELECT count(*) FROM agents a WHERE a.core_pk = c.id) AS agents"
        " FROM master_cores c LEFT JOIN repositories r ON r.id = c.repository_id"
        " WHERE c.state = 'approved' ORDER BY c.host_name, c.core_id",
    )
    facts.pending_requests = rows(
        conn,
        "SELECT id, core_id, host_name, customer_id, email, fingerprint, client_address,"
        " confirmed_at FROM master_cores WHERE state = 'pending' ORDER BY confirmed_at",
    )
    with _lock:
        counts = dict(COUNTS)
    for name, fn in counts.items():
        facts.counts[name] = int(fn(conn))
    return facts


class DatabaseCollector(Collector):
    """Gauges from the `Facts` read just before a scrape renders them."""

    def __init__(self) -> None:
        self.facts: Facts | None = None

    def describe(self) -> list[Any]:
        return []  # the families depend on the data; describe nothing up front

    def collect(self) -> Iterator[Any]:
        yield InfoMetricFamily("replicore_build", "replicore version.", {"version": __version__})
        facts = self.facts
        if facts is None:
            return
        used = GaugeMetricFamily(
            "replicore_repository_used_bytes",
            "Bytes stored in a repository.",
            labels=["repository"],
        )
        free = GaugeMetricFamily(
            "replicore_repository_free_bytes",
            "Bytes a repository can still take: quota left and disk free, the smaller.",
            labels=["repository"],
        )
        quota = GaugeMetricFamily(
            "replicore_repository_quota_bytes", "A repository's quota.", labels=["repository"]
        )
        for repo in facts.repositories:
            used.add_metric([repo.name], repo.used_bytes)
            free.add_metric([repo.name], repo.free_bytes)
            if repo.quota_bytes is not None:
                quota.add_metric([repo.name], repo.quota_bytes)
        yield used
        yield free
        yield quota
        sources = GaugeMetricFamily(
            "replicore_sources", "Source cores known, by pairing state.", labels=["state"]
        )
        for state in ("unconfirmed", "pending", "approved", "denied", "unpaired"):
            sources.add_metric([state], facts.sources_by_state.get(state, 0))
        yield sources
        yield GaugeMetricFamily(
            "replicore_pairing_requests_pending",
            "Confirmed pairing requests waiting for an operator.",
            value=facts.sources_by_state.get("pending", 0),
        )
        for name, value in sorted(facts.counts.items()):
            yield GaugeMetricFamily(f"replicore_{name}", f"Database count {name}.", value=value)
        yield GaugeMetricFamily(
            "replicore_disk_free_bytes",
            "Free bytes on the state directory's filesystem.",
            value=facts.disk_free_bytes,
        )
        yield GaugeMetricFamily(
            "replicore_disk_size_bytes",
            "Size of the state directory's filesystem.",
            value=facts.disk_size_bytes,
        )
        yield GaugeMetricFamily(
            "replicore_database_bytes",
            "Size of the SQLite file and its WAL.",
            value=facts.database_bytes,
        )


DATABASE = DatabaseCollector()
REGISTRY.register(DATABASE)


# --- the listener ---

ReadFacts = Callable[[], Awaitable[Facts]]


def render(facts: Facts | None, accept: str = "") -> tuple[bytes, str]:
    """The registry in the format the scraper accepts; facts from the database first."""
    encoder, content_type = choose_encoder(accept)
    DATABASE.facts = facts  # no await between setting and rendering: scrapes cannot mix
    return encoder(REGISTRY), content_type


def asgi_app(read: ReadFacts) -> Callable[..., Awaitable[None]]:
    """A minimal ASGI app: `GET /metrics` (and `/`), 404 elsewhere, lifespan accepted."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        if scope["path"] not in ("/metrics", "/"):
            await _answer(send, 404, b"not found; metrics are at /metrics\n")
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _answer(send, 405, b"GET only\n", [(b"allow", b"GET, HEAD")])
            return
        accept = ",".join(v.decode("latin-1") for k, v in scope["headers"] if k == b"accept")
        try:
            facts = await read()
        except Exception:
            log.exception("cannot read the database for metrics")
            facts = None
        body, content_type = render(facts, accept)
        if scope["method"] == "HEAD":
            body = b""
        await _answer(send, 200, body, [(b"content-type", content_type.encode())])

    return app


async def _answer(
    send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = headers or [(b"content-type", b"text/plain; charset=utf-8")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve(
    host: str,
    port: int,
    read: ReadFacts,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics over plain HTTP on host:port until shutdown_trigger returns;
    reports the bound URLs (e.g. ['http://127.0.0.1:9106'])."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve as hypercorn_serve

    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.metrics")
    config.graceful_timeout = 1.0
    config.include_server_header = False
    await hypercorn_serve(
        asgi_app(read),  # type: ignore[arg-type]
        config,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
        mode="asgi",
    )
