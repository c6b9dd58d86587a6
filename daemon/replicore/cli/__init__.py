"""The `replicore` command: one sub-command group per module, dispatched here.

Each module has `register(subparsers)` adding its commands; a command's handler takes the
parsed arguments and returns the exit status. Errors meant for the user are raised as
`CommandError` (or a store `ApiError`) and printed without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import ApiError
from . import common

#: The command words each module registers, so that a command imports its own module only
#: (importing them all, the daemon's web stack included, costs about half a second per run).
COMMANDS: dict[str, list[str]] = {
    "serve": ["serve", "check-config", "fingerprint"],
    "repository": ["repository"],
    "admin": ["admin"],
    "pairing": ["pairing"],
    "source": ["source"],
    "push": ["push"],
    "status": ["status"],
    "backup": ["backup-db"],
    "export": ["export"],
    "jobs": ["jobs"],
    "billing": ["billing"],
    "seed_drive": ["seed-drive"],
    "audit": ["audit"],
    "agents": ["agents"],
    "rps": ["rps"],
    "bin": ["bin"],
    "retention": ["retention"],
    "gc": ["gc"],
    "verify": ["verify"],
}
MODULE_OF = {word: module for module, words in COMMANDS.items() for word in words}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `command` alone when it is a known one."""
    parser = argparse.ArgumentParser(
        prog="replicore", description="Replication target daemon for backup appliances."
    )
    parser.add_argument("--version", action="version", version=f"replicore {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = [MODULE_OF[command]] if command in MODULE_OF else list(COMMANDS)
    for name in modules:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def _command_word(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


#: Errors shown as one line with exit status 2, besides `common.CommandError`: (module, class).
#: Looked up among the modules already imported, so that a command that never reads the
#: config or opens the database does not import them (the store's import costs start-up) just
#: to name errors it cannot raise.
USAGE_ERRORS = (("replicore.config", "ConfigError"), ("replicore.store.db", "NoDatabase"))


def _usage_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [common.CommandError]
    for module_name, class_name in USAGE_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None:
            kinds.append(getattr(module, class_name))
    return tuple(kinds)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command_word(argv)).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except _usage_errors() as error:  # evaluated only once an exception is being handled
        print(f"replicore: {error}", file=sys.stderr)
        return 2
    except ApiError as error:
        print(f"replicore: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
