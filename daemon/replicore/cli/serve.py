"""`replicore serve`, `check-config` and `fingerprint`: the commands that run the daemon
and show its config and TLS identity.

`serve` hands the loaded config to `replicore.daemon`, which is imported only then: the
daemon's web stack takes about 0.4 s to load, and `check-config` runs before every start
of the systemd unit.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import certs
from .common import add_config_option, load_config


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the daemon",
        description="Run the replication target. Logs JSON lines on stderr; SIGHUP reloads "
        "the config and TLS certificate, SIGTERM stops gracefully. Speaks systemd's "
        "notify protocol when $NOTIFY_SOCKET is set.",
    )
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


def run_serve(args: argparse.Namespace) -> int:
    from .. import daemon

    return daemon.run(load_config(args))
