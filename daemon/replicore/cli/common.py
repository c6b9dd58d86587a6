"""What every command shares: the --config option, opening the database, printing.

The config and the store are imported by the functions that use them, not with this module:
commands that need neither (`push`, `source`) start without them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import apsw

    from ..config import Config


class CommandError(RuntimeError):
    """A failure to report to the user as one line, exit status 2."""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $REPLICORE_CONFIG, then /etc/replicore/replicore.toml)",
    )


def load_config(args: argparse.Namespace) -> Config:
    from .. import config

    return config.load(getattr(args, "config", None))


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[apsw.Connection]:
    """The daemon's database, opened for this command (never created here)."""
    from ..store import db

    conn = db.open_existing(load_config(args).database_path)
    try:
        yield conn
    finally:
        conn.close()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'500G', '1.5TiB', '4096' -> bytes (powers of 1024)."""
    found = _SIZE.match(text)
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500G or 1TiB")
    number, unit = float(found.group(1)), found.group(2).lower()
    return int(number * 1024 ** "_kmgtp".index(unit or "_"))


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def read_password(from_stdin: bool, prompt: str = "Password: ", confirm: bool = False) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    password = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != password:
        raise CommandError("the passwords differ")
    return password


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    print()
