"""`replicore serve`, `check-config` and `fingerprint`: running the daemon and its TLS identity."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from .. import certs
from ..app import create_app
from ..config import Config, parse_listen
from ..runtime import Runtime
from ..server import TrustStore, hypercorn_config, serve
from ..store import cores, meta, migrations
from ..store.db import Database, connect
from .common import add_config_option, load_config

log = logging.getLogger("replicore")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the daemon")
    add_config_option(p)
    p.set_defaults(handler=run_serve)

    p = subparsers.add_parser("check-config", help="validate the config file and exit")
    add_config_option(p)
    p.set_defaults(handler=run_check_config)

    p = subparsers.add_parser("fingerprint", help="print the server certificate's SHA-256")
    add_config_option(p)
    p.set_defaults(handler=run_fingerprint)


def run_check_config(args: argparse.Namespace) -> int:
    config = load_config(args)
    where = config.source or "embedded defaults (no config file found)"
    print(f"config OK: {where}")
    return 0


def server_certificate(config: Config) -> tuple[Path, Path]:
    if config.server.tls_cert and config.server.tls_key:
        return config.server.tls_cert, config.server.tls_key
    return certs.ensure_server_certificate(config.tls_dir)


def run_fingerprint(args: argparse.Namespace) -> int:
    config = load_config(args)
    cert_path = config.server.tls_cert if config.server.tls_cert else config.tls_dir / "server.crt"
    if not cert_path.exists():
        print(
            f"replicore: no server certificate at {cert_path.resolve()}; "
            "`replicore serve` makes it at first start",
            file=sys.stderr,
        )
        return 2
    print(certs.file_fingerprint(cert_path))
    return 0


def prepare_state(config: Config) -> tuple[str, Path, Path]:
    """Create the state directory, database schema and TLS material; returns
    (core id, certificate path, key path)."""
    config.server.state_dir.mkdir(parents=True, exist_ok=True)
    conn = connect(config.database_path, create=True)
    try:
        migrations.apply(conn, config.database_path)
        core_id = meta.core_id(conn)
    finally:
        conn.close()
    cert_path, key_path = server_certificate(config)
    return core_id, cert_path, key_path


def run_serve(args: argparse.Namespace) -> int:
    config = load_config(args)
    logging.basicConfig(
        level=config.log.level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    core_id, cert_path, key_path = prepare_state(config)
    trio.run(serve_daemon, config, core_id, cert_path, key_path)
    return 0


async def serve_daemon(config: Config, core_id: str, cert_path: Path, key_path: Path) -> None:
    trust = TrustStore(cert_path, key_path)
    db = Database(config.database_path, readers=config.server.db_readers)
    for pem in await db.read(cores.trusted_certificates):
        trust.add(pem)
    fingerprint = certs.file_fingerprint(cert_path)
    runtime = Runtime(
        config=config, db=db, trust=trust, core_id=core_id, server_fingerprint=fingerprint
    )
    app = create_app(runtime)
    host, port = parse_listen(config.server.listen)
    stop = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            runtime.nursery = nursery
            nursery.start_soon(_signals, stop, trust)
            bound = await nursery.start(
                serve_until,
                app,
                hypercorn_config(host, port, config.server.shutdown_timeout),
                trust,
                stop,
            )
            _announce(config, core_id, fingerprint, bound)
            await stop.wait()
            log.info("stopping")
    finally:
        db.close()
        (config.server.state_dir / "daemon.json").unlink(missing_ok=True)
    log.info("stopped")


async def serve_until(
    app: Any,
    hconfig: Any,
    trust: TrustStore,
    stop: trio.Event,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(app, hconfig, trust, shutdown_trigger=stop.wait, task_status=task_status)
    stop.set()


async def _signals(stop: trio.Event, trust: TrustStore) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                trust.reload_certificate()
                log.info("reloaded the server certificate")
                continue
            stop.set()
            return


def _announce(config: Config, core_id: str, fingerprint: str, bound: list[tuple[str, int]]) -> None:
    urls = [f"https://{h if ':' not in h else f'[{h}]'}:{p}" for h, p in bound]
    log.info("core id %s; server certificate SHA-256 %s", core_id, fingerprint)
    for url in urls:
        log.info("listening on %s%s", url, config.server.url_prefix)
    info = {"pid": os.getpid(), "coreId": core_id, "fingerprint": fingerprint, "urls": urls}
    path = config.server.state_dir / "daemon.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)
