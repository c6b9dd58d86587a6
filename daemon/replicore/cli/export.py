"""`replicore export`: write a replicated volume image back out, exactly as it was pushed.

Runs on the target against its database (the daemon may be running: the export reads one
consistent snapshot). The image is chosen by agent and volume, then by epoch, by recovery
point, or else the latest committed epoch; `--source` picks the source when two sources have
an agent of that id. An orphaned image is refused, naming the epoch it is missing.

The image is read by `store/image_reader.py` (every block checked against its key on a small
thread pool) and written to FILE.tmp by the same threads at each chunk's offset, with direct
I/O where the file system takes it; all-zero blocks are left as holes. The file is fsynced,
renamed to FILE and the rename made durable; the command prints the bytes written and the
BLAKE3 of the output (SHA-256 too with `--sha256`), hashed in order as the chunks come.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import apsw
import blake3

from ..store import image_reader, images
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


#: Bytes written between two requests to start writing them back to disk, so that the final
#: fsync finds most of the file on disk already (when the file is written through the cache).
WRITEBACK_BYTES = 64 * 1024 * 1024
#: Alignment of offsets and lengths that direct I/O is given (chunks are page-aligned and
#: blocks are at least 4 KiB; only the image's last page can be short).
DIRECT_ALIGN = 4096


class _Output:
    """FILE.tmp, written at offsets from several threads: with O_DIRECT where the file system
    takes it (no copy into the page cache, nothing left to write back at the fsync, the
    daemon's cache left alone), else through the page cache. Zero blocks are never written:
    the file is sized first, so they stay holes."""

    def __init__(self, path: Path, size: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self.direct_fd: int | None = None
        #: Whether writes go through `direct_fd` (until the device refuses their alignment).
        self.direct = False
        self.flushed = 0
        try:
            os.ftruncate(self.fd, size)
            self._open_direct(path)
        except BaseException:
            self.close()
            raise

    def _open_direct(self, path: Path) -> None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return
        try:
            self.direct_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | flag)
        except OSError as error:
            if error.errno == errno.EINVAL:  # no direct I/O on this file system
                return
            raise
        mine, opened = os.fstat(self.fd), os.fstat(self.direct_fd)
        self.direct = (mine.st_dev, mine.st_ino) == (opened.st_dev, opened.st_ino)

    def write(self, data: memoryview, offset: int) -> None:
        if self.direct and self.direct_fd is not None:
            aligned = len(data) - len(data) % DIRECT_ALIGN
            try:
                _pwrite_all(self.direct_fd, data[:aligned], offset)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self.direct = False  # alignment this device does not take: use the cache
            else:
                data, offset = data[aligned:], offset + aligned
        _pwrite_all(self.fd, data, offset)

    def written(self, offset: int) -> None:
        """Everything before `offset` is written: start writing it back (cached writes)."""
        if not self.direct and offset - self.flushed >= WRITEBACK_BYTES:
            os.posix_fadvise(self.fd, self.flushed, offset - self.flushed, os.POSIX_FADV_DONTNEED)
            self.flushed = offset

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
        os.close(self.fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset`, however short the kernel's writes are."""
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def export(
    conn: apsw.Connection, image_id: int, output: Path, *, sha256: bool = False
) -> tuple[int, str, str | None]:
    """Write the image to `output` (through output.tmp, fsynced, renamed); returns
    (bytes written, BLAKE3 hex, SHA-256 hex or None). All-zero blocks are left as holes.
    Call inside a read transaction."""
    reason = images.orphan_reason(conn, image_id)
    if reason is not None:
        raise CommandError(reason)
    image = images.get(conn, image_id)
    size, block_size = image["size"], image["block_size"]
    hashers: list[Any] = [blake3.blake3()]
    if sha256:
        hashers.append(hashlib.sha256())
    tmp = output.with_name(output.name + ".tmp")

    def write(chunk: image_reader.Chunk) -> None:
        base = chunk.start * block_size
        for begin, end in chunk.runs:
            out.write(chunk.data[begin:end], base + begin)

    try:
        out = _Output(tmp, size)
        try:
            chunks = image_reader.read_chunks(conn, image_id, each=write)
            with contextlib.closing(chunks):  # its threads are done writing before the close
                for chunk in chunks:
                    for hasher in hashers:
                        hasher.update(chunk.data)
                    out.written(chunk.start * block_size + len(chunk.data))
            out.sync()
        finally:
            out.close()
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(output.parent)
    hexes = [hasher.hexdigest() for hasher in hashers]
    return size, hexes[0], hexes[1] if sha256 else None


def _sync_directory(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
