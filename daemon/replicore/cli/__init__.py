"""The `replicore` command: one sub-command group per module, dispatched here.

Each module has `register(subparsers)` adding its commands; a command's handler takes the
parsed arguments and returns the exit status. Errors meant for the user are raised as
`CommandError` (or a store `ApiError`) and printed without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..config import ConfigError
from ..errors import ApiError
from ..store.db import NoDatabase
from . import (
    admin,
    agents,
    audit,
    backup,
    billing,
    bin,
    common,
    export,
    gc,
    jobs,
    pairing,
    push,
    repository,
    retention,
    rps,
    seed_drive,
    serve,
    source,
    status,
    verify,
)

MODULES = [
    serve,
    repository,
    admin,
    pairing,
    source,
    push,
    status,
    backup,
    export,
    jobs,
    billing,
    seed_drive,
    audit,
    agents,
    rps,
    bin,
    retention,
    gc,
    verify,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replicore", description="Replication target daemon for backup appliances."
    )
    parser.add_argument("--version", action="version", version=f"replicore {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (common.CommandError, ConfigError, NoDatabase) as error:
        print(f"replicore: {error}", file=sys.stderr)
        return 2
    except ApiError as error:
        print(f"replicore: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
