"""`replicore backup-db -o FILE`: an online, consistent copy of the database, and the copy
`serve` takes by itself before a migration changes an existing schema.

The copy uses SQLite's online backup API (apsw) in a single step: it reads every page inside
one read transaction, so it is one consistent snapshot even while the daemon writes (WAL
readers do not block the writer). It is written to a temporary file (mode 0600: it holds
password hashes and certificates), switched to a self-contained rollback-journal file,
checked (`PRAGMA quick_check`), fsynced and only then renamed to its name.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

from ..config import Config
from .common import CommandError, add_config_option, database, format_size, load_config

log = logging.getLogger("replicore.backup")

#: Free space a backup needs beyond the database's own size.
SPACE_MARGIN = 1.05


@dataclass
class BackupResult:
    path: Path
    bytes: int
    pages: int
    schema_version: int
    seconds: float


class BackupError(RuntimeError):
    """The copy could not be made; nothing was left at the destination."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "backup-db",
        help="copy the database consistently, also while the daemon runs",
        description="Write an online, consistent copy of the database to FILE (SQLite's "
        "backup API; the daemon may keep running). The copy is checked before it gets its "
        "name. To restore: stop the daemon, put the copy in place of STATE_DIR/replicore.db, "
        "remove replicore.db-wal and replicore.db-shm, start it.",
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    add_config_option(p)
    p.set_defaults(handler=run_backup)


def run_backup(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and not args.force:
        raise CommandError(f"{output} exists; use --force to replace it")
    if output.is_dir():
        raise CommandError(f"{output} is a directory")
    config = load_config(args)
    with database(args) as conn:
        try:
            result = backup(conn, output, size_hint=database_size(config))
        except BackupError as error:
            raise CommandError(str(error)) from None
    print(
        f"wrote {result.path} ({format_size(result.bytes)}, schema {result.schema_version}, "
        f"{result.seconds:.1f} s); quick_check ok"
    )
    return 0


def database_size(config: Config) -> int:
    path = config.database_path
    wal = path.with_name(path.name + "-wal")
    return sum(p.stat().st_size for p in (path, wal) if p.exists())


def backup(source: apsw.Connection, output: Path, size_hint: int = 0) -> BackupResult:
    """Copy the `main` database of `source` to `output` consistently; raises BackupError."""
    start = time.monotonic()
    output = output.absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    free = os.statvfs(output.parent).f_bavail * os.statvfs(output.parent).f_frsize
    if size_hint and free < size_hint * SPACE_MARGIN:
        raise BackupError(
            f"not enough space for a copy in {output.parent}: {format_size(free)} free, "
            f"the database takes {format_size(size_hint)}"
        )
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        dest = apsw.Connection(str(tmp))
        try:
            with dest.backup("main", source, "main") as step:
                while not step.done:
                    # Every page in one step: one read transaction, one consistent snapshot.
                    step.step(-1)
                pages = step.pagecount
            dest.execute("PRAGMA journal_mode=DELETE")
            problems = [r[0] for r in dest.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise BackupError(f"the copy fails quick_check: {'; '.join(problems[:5])}")
            version = int(dest.execute("PRAGMA user_version").fetchone()[0])
        finally:
            dest.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, output)
        directory = os.open(output.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except apsw.Error as error:
        raise BackupError(f"cannot copy the database to {output}: {error}") from None
    except OSError as error:
        raise BackupError(f"cannot write {output}: {error.strerror or error}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        for suffix in ("-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(str(tmp) + suffix).unlink()
    return BackupResult(output, output.stat().st_size, pages, version, time.monotonic() - start)


def before_migration(config: Config, source: apsw.Connection, version: int) -> Path:
    """The automatic copy `serve` takes before migrating schema `version`: into
    `server.backup_dir` (default STATE_DIR/backups), named after the schema and the time."""
    directory = config.server.backup_dir or config.server.state_dir / "backups"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    output = directory / f"replicore-schema{version}-{stamp}.db"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    result = backup(source, output, size_hint=database_size(config))
    log.info("copied the database (schema %d) to %s before migrating it", version, result.path)
    return result.path
