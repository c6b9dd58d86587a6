"""The running daemon: what `replicore serve` runs once its config is loaded.

It prepares the state directory (schema migrations, with a backup copy first when an existing
schema changes; the TLS certificate), then runs in one trio nursery: the TLS API server, the
metrics listener, the control socket, the systemd watchdog and signal handling. It tells
systemd READY=1 once it listens, and:
- SIGHUP (or `reload` on the control socket): re-reads the config; a bad file is refused
  and the daemon carries on unchanged. Otherwise the TLS certificate and key are loaded into
  the live SSL context (open connections keep theirs, new handshakes get the new one), and
  the log level and per-request limits take effect; listen addresses, the URL prefix, the
  state directory and the database pool need a restart (logged).
- SIGTERM/SIGINT: STOPPING=1; new connections are refused, running requests get
  `server.shutdown_timeout` seconds to finish and are then cancelled (a database write in
  progress always completes or rolls back whole: nothing half-committed), background tasks
  are cancelled, and the process exits 0.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import trio

from . import __version__, certs, control, logs, metrics
from . import config as config_module
from .app import create_app
from .cli import backup
from .config import Config, ConfigError, parse_listen
from .notify import Notifier
from .runtime import Runtime
from .server import TrustStore, hypercorn_config, serve
from .store import cores, meta, migrations
from .store.db import Database, connect

log = logging.getLogger("replicore")

E = TypeVar("E", bound=BaseException)

#: Seconds beyond shutdown_timeout for closing listeners, lifespan and the database.
SHUTDOWN_MARGIN = 5.0

#: Options a reload cannot change in a running daemon (the old value stays until restart).
RESTART_ONLY = (
    ("server", "listen"),
    ("server", "url_prefix"),
    ("server", "state_dir"),
    ("server", "db_readers"),
    ("server", "max_bulk_requests"),
    ("server", "shutdown_timeout"),
    ("server", "backup_dir"),
    ("server", "max_database_bytes"),
    ("metrics", "listen"),
    ("console", "enabled"),
    ("console", "path"),
    ("console", "usage_sample_interval"),
)


class StartupError(RuntimeError):
    """The daemon cannot start (an address in use, another daemon on the state directory)."""


def run(config: Config) -> int:
    """Prepare the state directory and serve until stopped; the exit status."""
    os.umask(0o077)  # the database holds password hashes; nothing here is for other users
    setup_logging(config)
    notifier = Notifier()
    notifier.status("preparing the state directory")
    try:
        control.ensure_not_running(control.socket_path(config.server.state_dir))
        core_id, cert_path, key_path = prepare_state(config)
    except (
        control.AlreadyRunning,
        backup.BackupError,
        migrations.SchemaTooNew,
        OSError,
    ) as error:
        log.critical("cannot prepare %s: %s", config.server.state_dir, error)
        notifier.status(f"failed: {error}")
        return 1
    try:
        trio.run(serve_daemon, config, core_id, cert_path, key_path, notifier)
    except BaseException as error:
        startup = _found_in(error, StartupError)
        if startup is None:
            raise
        log.critical("cannot start: %s", startup)
        notifier.status(f"failed: {startup}")
        return 1
    return 0


def server_certificate(config: Config) -> tuple[Path, Path]:
    if config.server.tls_cert and config.server.tls_key:
        return config.server.tls_cert, config.server.tls_key
    return certs.ensure_server_certificate(config.tls_dir)


def prepare_state(config: Config) -> tuple[str, Path, Path]:
    """Create the state directory, database schema and TLS material; returns
    (core id, certificate path, key path). Before a migration changes an existing schema
    the database is copied (`backup.before_migration`)."""
    config.server.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    conn = connect(config.database_path, create=True)
    try:
        migrations.apply(
            conn,
            config.database_path,
            before_change=lambda version: backup.before_migration(config, conn, version),
        )
        core_id = meta.core_id(conn)
    finally:
        conn.close()
    cert_path, key_path = server_certificate(config)
    return core_id, cert_path, key_path


def setup_logging(config: Config) -> None:
    if config.log.format == "json":
        logs.setup(config.log.level)
    else:
        logging.basicConfig(
            stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        logs.set_level(config.log.level)
    # Hypercorn's own logger names its errors; its access log is ours (replicore.access).
    for name in ("hypercorn.error", "hypercorn.metrics"):
        logging.getLogger(name).setLevel(max(logging.getLogger().level, logging.WARNING))


class Daemon:
    """The running daemon's parts, and what it answers on the control socket."""

    def __init__(self, runtime: Runtime, app: Any, notifier: Notifier, stop: trio.Event) -> None:
        self.runtime, self.app, self.notifier, self.stop = runtime, app, notifier, stop
        self.api_urls: list[str] = []
        self.metrics_urls: list[str] = []
        self.control_path: Path | None = None
        self.reloads = 0

    @property
    def config(self) -> Config:
        return self.runtime.config

    async def status(self) -> dict[str, Any]:
        facts = await self.runtime.db.read(_live_counts)
        started = self.runtime.started_at
        return {
            "version": __version__,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "startedAt": started,
            "uptimeSeconds": round(time.time() - started, 3),
            "coreId": self.runtime.core_id,
            "fingerprint": self.runtime.server_fingerprint,
            "listen": self.api_urls,
            "urlPrefix": self.config.server.url_prefix,
            "metrics": [f"{url}/metrics" for url in self.metrics_urls],
            "config": str(self.config.source.absolute()) if self.config.source else None,
            "stateDir": str(self.config.server.state_dir.absolute()),
            "requestsInProgress": metrics.live_value(metrics.REQUESTS_IN_FLIGHT),
            "uploadsInProgress": metrics.live_value(metrics.UPLOADS_IN_PROGRESS),
            "stopping": self.stop.is_set(),
            "reloads": self.reloads,
            **facts,
        }

    async def reload_command(self) -> dict[str, Any]:
        return self.reload()

    def reload(self) -> dict[str, Any]:
        """Re-read the config and the TLS certificate; a bad config or certificate is
        refused and nothing changes. Returns what happened (for the control socket)."""
        self.notifier.reloading()
        try:
            return self._reload()
        finally:
            self.notifier.ready(status=self.status_line())

    def _reload(self) -> dict[str, Any]:
        old = self.config
        try:
            new = config_module.load(old.source)
        except ConfigError as error:
            log.error("reload refused, the running config stays: %s", error)
            return {"reloaded": False, "error": str(error)}
        kept = []
        for section, option in RESTART_ONLY:
            if not hasattr(getattr(old, section, None), option):
                continue
            before, after = (
                getattr(getattr(old, section), option),
                getattr(getattr(new, section), option),
            )
            if before != after:
                kept.append(f"{section}.{option}")
                new = dataclasses.replace(
                    new, **{section: dataclasses.replace(getattr(new, section), **{option: before})}
                )
        if kept:
            log.warning("reload: %s change(s) need a restart; kept the running values", kept)
        try:
            cert_path, key_path = server_certificate(new)
            trial = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            trial.load_cert_chain(str(cert_path), str(key_path))
            fingerprint = certs.file_fingerprint(cert_path)
        except (OSError, ssl.SSLError, ValueError) as error:
            log.error("reload refused, the certificate or key cannot be used: %s", error)
            return {"reloaded": False, "error": f"certificate: {error}"}
        trust = self.runtime.trust
        trust.cert_path, trust.key_path = cert_path, key_path
        trust.reload_certificate()
        changed_certificate = fingerprint != self.runtime.server_fingerprint
        self.runtime.server_fingerprint = fingerprint
        self.runtime.config = new
        self.app.config["MAX_CONTENT_LENGTH"] = new.server.max_request_bytes
        logs.set_level(new.log.level)
        self.reloads += 1
        write_daemon_info(self)
        log.info(
            "reloaded the config%s; server certificate SHA-256 %s",
            f" from {new.source}" if new.source else "",
            fingerprint,
            extra={"data": {"certificate_changed": changed_certificate, "kept": kept}},
        )
        return {
            "reloaded": True,
            "fingerprint": fingerprint,
            "certificateChanged": changed_certificate,
            "needRestart": kept,
        }

    def status_line(self) -> str:
        return f"serving on {', '.join(self.api_urls) or '?'}"


def _live_counts(conn: Any) -> dict[str, Any]:
    with metrics._lock:
        counts = dict(metrics.COUNTS)
    found = {name: int(fn(conn)) for name, fn in counts.items()}
    return {
        "sessionsOpen": found.get("sessions_open"),
        "jobsRunning": found.get("jobs_running"),
    }


#: Allocations between collections of the youngest generation, and collections of each
#: generation between collections of the next (Python's defaults: 700, 10, 10).
GC_THRESHOLDS = (10_000, 20, 100)


def _tune_gc() -> None:
    """Keep the cyclic garbage collector from pausing the daemon: what exists once started
    (modules, the app, the routes) is never scanned again, and the young generation is
    collected less often. A full collection of a busy daemon took up to 170 ms, every
    request and every record batch waiting on it (the collector holds the GIL); almost all
    the daemon's garbage has no cycles and goes with its last reference anyway."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve_daemon(
    config: Config,
    core_id: str,
    cert_path: Path,
    key_path: Path,
    notifier: Notifier | None = None,
) -> None:
    notifier = notifier or Notifier()
    trust = TrustStore(cert_path, key_path)
    db = Database(
        config.database_path,
        readers=config.server.db_readers,
        max_bytes=config.server.max_database_bytes,
    )
    for pem in await db.read(cores.trusted_certificates):
        trust.add(pem)
    fingerprint = certs.file_fingerprint(cert_path)
    runtime = Runtime(
        config=config, db=db, trust=trust, core_id=core_id, server_fingerprint=fingerprint
    )
    metrics.START_TIME.set(runtime.started_at)
    app = create_app(runtime)
    _tune_gc()
    host, port = parse_listen(config.server.listen)
    stop = trio.Event()
    server_done = trio.Event()
    daemon = Daemon(runtime, app, notifier, stop)
    runtime.extras["daemon"] = daemon
    try:
        async with trio.open_nursery() as nursery:
            runtime.nursery = nursery
            nursery.start_soon(_signals, daemon)
            try:
                bound = await nursery.start(
                    serve_until,
                    app,
                    hypercorn_config(host, port, config.server.shutdown_timeout),
                    trust,
                    stop,
                    server_done,
                )
            except BaseException as error:
                if (found := _found_in(error, OSError)) is None:
                    raise
                raise StartupError(f"server.listen {config.server.listen}: {found}") from None
            daemon.api_urls = [_url("https", h, p) for h, p in bound]
            if config.metrics.listen:
                daemon.metrics_urls = await _start_metrics(nursery, config, db, stop)
            try:
                daemon.control_path = await nursery.start(
                    control.serve,
                    control.socket_path(config.server.state_dir),
                    {"status": daemon.status, "reload": daemon.reload_command},
                )
            except (control.AlreadyRunning, OSError) as error:
                raise StartupError(f"control socket: {error}") from None
            nursery.start_soon(notifier.watchdog_loop)
            _announce(daemon)
            notifier.ready(status=daemon.status_line())
            await stop.wait()
            log.info("stopping: running requests get %.0f s", config.server.shutdown_timeout)
            notifier.stopping(status="stopping: finishing running requests")
            with trio.move_on_after(config.server.shutdown_timeout + SHUTDOWN_MARGIN):
                await server_done.wait()
            nursery.cancel_scope.cancel()  # metrics, control socket, watchdog, background
    finally:
        db.close()
        (config.server.state_dir / "daemon.json").unlink(missing_ok=True)
    log.info("stopped")


async def _start_metrics(
    nursery: trio.Nursery, config: Config, db: Database, stop: trio.Event
) -> list[str]:
    state_dir, database_path = config.server.state_dir, config.database_path

    async def read() -> metrics.Facts:
        return await db.read(metrics.read_facts, state_dir, database_path)

    host, port = parse_listen(config.metrics.listen)
    try:
        binds: list[str] = await nursery.start(metrics.serve, host, port, read, stop.wait)
    except BaseException as error:
        if (found := _found_in(error, OSError)) is None:
            raise
        # Monitoring is not worth stopping replication for: serve on, say so loudly.
        log.error(
            "no metrics: cannot listen on metrics.listen %s: %s", config.metrics.listen, found
        )
        return []
    return binds


def _found_in(error: BaseException, kind: type[E]) -> E | None:
    """`error` if it is a `kind`, else the first `kind` inside the exception groups trio
    wrapped it in."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _found_in(inner, kind)) is not None:
                return found
    return None


async def serve_until(
    app: Any,
    hconfig: Any,
    trust: TrustStore,
    stop: trio.Event,
    done: trio.Event,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve(app, hconfig, trust, shutdown_trigger=stop.wait, task_status=task_status)
    finally:
        stop.set()
        done.set()


async def _signals(daemon: Daemon) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                daemon.reload()
            elif daemon.stop.is_set():
                log.info("received %s; already stopping", signal.Signals(signum).name)
            else:
                log.info("received %s", signal.Signals(signum).name)
                daemon.stop.set()


def _url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"


def _announce(daemon: Daemon) -> None:
    runtime = daemon.runtime
    log.info(
        "replicore %s: core id %s; server certificate SHA-256 %s",
        __version__,
        runtime.core_id,
        runtime.server_fingerprint,
    )
    for url in daemon.api_urls:
        log.info("listening on %s%s", url, runtime.config.server.url_prefix)
    for url in daemon.metrics_urls:
        log.info("metrics on %s/metrics", url)
    write_daemon_info(daemon)


def write_daemon_info(daemon: Daemon) -> None:
    """state_dir/daemon.json: what a local tool (and the tests) need to reach the daemon."""
    runtime = daemon.runtime
    info = {
        "pid": os.getpid(),
        "coreId": runtime.core_id,
        "fingerprint": runtime.server_fingerprint,
        "urls": daemon.api_urls,
        "metrics": [f"{url}/metrics" for url in daemon.metrics_urls],
        "control": str(daemon.control_path) if daemon.control_path else None,
    }
    path = runtime.config.server.state_dir / "daemon.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)
