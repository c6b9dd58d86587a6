"""`replicore export`: write a replicated volume image back out, exactly as it was pushed.

Runs on the target against its database (the daemon may be running: the export reads one
consistent snapshot). The image is chosen by agent and volume, then by epoch, by recovery
point, or else the latest committed epoch; `--source` picks the source when two sources have
an agent of that id. An orphaned image is refused, naming the epoch it is missing. The bytes
go to FILE.tmp, are flushed to disk, then renamed to FILE; the command prints the bytes
written and the BLAKE3 and SHA-256 of the output.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import blake3

from ..store import images
from ..store.db import row, rows
from .common import CommandError, add_config_option, database


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a replicated volume image to a file",
        description="Write a committed volume image of an agent to FILE, exactly as it was "
        "pushed (the latest committed epoch unless --epoch or --recovery-point says which).",
    )
    p.add_argument("--agent", required=True, metavar="ID", help="the agent id")
    p.add_argument(
        "--source", metavar="CORE_ID", help="the source's core id (when two sources have ID)"
    )
    p.add_argument("--volume", required=True, metavar="DRIVER_VOLUME_ID")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--epoch", type=int, metavar="N", help="this epoch of the volume")
    which.add_argument(
        "--recovery-point", metavar="ID", help="the volume's image in this recovery point"
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument(
        "--sha256",
        action="store_true",
        help="also print the SHA-256 of the image (BLAKE3 is always printed; SHA-256 costs"
        " about half a second per GiB more)",
    )
    add_config_option(p)
    p.set_defaults(handler=run_export)


def find_agent(conn: apsw.Connection, agent_id: str, source: str | None) -> dict[str, Any]:
    """The agent row of `agent_id` (of source core `source` when given)."""
    found = rows(
        conn,
        "SELECT a.*, c.core_id AS source_core_id FROM agents a"
        " JOIN master_cores c ON c.id = a.core_pk WHERE a.agent_id = ? ORDER BY c.core_id",
        (agent_id,),
    )
    if source is not None:
        found = [a for a in found if a["source_core_id"] == source]
    if not found:
        of = f" of source {source}" if source else ""
        raise CommandError(f"no agent {agent_id!r}{of} on this core")
    if len(found) > 1:
        cores = ", ".join(a["source_core_id"] for a in found)
        raise CommandError(f"sources {cores} each have an agent {agent_id!r}: choose with --source")
    return found[0]


def find_image(
    conn: apsw.Connection,
    agent: dict[str, Any],
    volume: str,
    epoch: int | None,
    recovery_point: str | None,
) -> dict[str, Any]:
    what = f"agent {agent['agent_id']}"
    if epoch is not None:
        image = images.find(conn, agent["id"], volume, epoch)
        if image is None:
            raise CommandError(f"{what} has no committed volume image {volume}:{epoch}")
        return image
    if recovery_point is not None:
        point = images.find_recovery_point(conn, agent["id"], recovery_point)
        if point is None:
            raise CommandError(f"{what} has no recovery point {recovery_point!r}")
        image = row(
            conn,
            "SELECT * FROM volume_images WHERE recovery_point_pk = ? AND driver_volume_id = ?",
            (point["id"], volume),
        )
        if image is None:
            raise CommandError(f"recovery point {recovery_point!r} has no image of volume {volume}")
        return image
    image = images.latest(conn, agent["id"], volume)
    if image is None:
        raise CommandError(f"{what} has no committed volume image of volume {volume}")
    return image


_END = object()
#: Blocks read ahead of the writer (64 KiB blocks: 4 MiB).
READ_AHEAD = 64


def _read_ahead(conn: apsw.Connection, image_id: int) -> Iterator[bytes]:
    """`images.read_image` on a thread of its own, so that fetching, decompressing and
    checking the records overlaps writing and hashing the file (the connection is used by
    that thread alone until the generator ends)."""
    blocks: queue.Queue[Any] = queue.Queue(maxsize=READ_AHEAD)
    stop = threading.Event()

    def produce() -> None:
        try:
            for block in images.read_image(conn, image_id):
                if stop.is_set():
                    return
                blocks.put(block)
            blocks.put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            blocks.put(error)

    reader = threading.Thread(target=produce, name="export-reader", daemon=True)
    reader.start()
    try:
        while (item := blocks.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():  # let a producer blocked on a full queue finish
            with contextlib.suppress(queue.Empty):
                blocks.get(timeout=0.05)
        reader.join()


def export(
    conn: apsw.Connection, image_id: int, output: Path, *, sha256: bool = False
) -> tuple[int, str, str | None]:
    """Write the image to `output` (through output.tmp, fsynced, renamed); returns
    (bytes written, BLAKE3 hex, SHA-256 hex or None). Call inside a read transaction."""
    reason = images.orphan_reason(conn, image_id)
    if reason is not None:
        raise CommandError(reason)
    tmp = output.with_name(output.name + ".tmp")
    b3, sha = blake3.blake3(), hashlib.sha256() if sha256 else None
    written = 0
    try:
        with tmp.open("wb") as out:
            for block in _read_ahead(conn, image_id):
                out.write(block)
                b3.update(block)
                if sha is not None:
                    sha.update(block)
                written += len(block)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written, b3.hexdigest(), sha.hexdigest() if sha is not None else None


def run_export(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.is_dir():
        raise CommandError(f"{output} is a directory")
    with database(args) as conn:
        conn.execute("BEGIN")  # one snapshot for the whole export
        try:
            agent = find_agent(conn, args.agent, args.source)
            image = find_image(conn, agent, args.volume, args.epoch, args.recovery_point)
            written, b3, sha = export(conn, image["id"], output, sha256=args.sha256)
        finally:
            conn.execute("ROLLBACK")
    print(
        f"exported volume image {images.name(image)} of agent {agent['agent_id']}"
        f" (source {agent['source_core_id']}) to {output}"
    )
    print(f"bytes   {written}")
    print(f"blake3  {b3}")
    if sha is not None:
        print(f"sha256  {sha}")
    return 0
