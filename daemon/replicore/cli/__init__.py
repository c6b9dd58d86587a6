"""The `replicore` command: one sub-command group per module, dispatched here.

Each module has `register(subparsers)` adding its commands; a command's handler takes the
parsed arguments and returns the exit status. Errors meant for the user are raised as
`CommandError` (or a store `ApiError`) and printed without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence

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


#: Packages that a command's imports would load though the command never uses them: httpcore,
#: push's HTTP client, imports trio and anyio (for its async API) and h2 (for HTTP/2) whenever
#: they are installed, as they are for the daemon; push speaks synchronous HTTP/1.1, and trio
#: alone is a third of its start-up. Hidden while the command's module is imported, in a
#: command process only (`main()` without arguments): httpcore's async API then stays off for
#: the rest of that process, which never calls it.
UNUSED_IMPORTS: dict[str, tuple[str, ...]] = {"push": ("trio", "anyio", "h2")}


@contextlib.contextmanager
def _hidden(names: Sequence[str]) -> Iterator[None]:
    """Make `import NAME` fail with ImportError for these packages, unless already imported."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # the documented way to hide one
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def main(argv: Sequence[str] | None = None) -> int:
    command_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    word = _command_word(argv)
    with _hidden(UNUSED_IMPORTS.get(word or "", ()) if command_process else ()):
        parser = build_parser(word)
    args = parser.parse_args(argv)
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
