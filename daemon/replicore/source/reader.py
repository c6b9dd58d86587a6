"""Reading a volume image (a file or a block device) block by block, without keeping it in memory.

An `Image` is an open, read-only file descriptor with its size (block devices have no st_size:
the size is where the descriptor seeks to at its end) and a block size.  The hash pass reads it
sequentially into one reused buffer (`read_into`); the send pass reads back only the blocks the
target lacks (`read_blocks`, one `preadv` per run of consecutive blocks).  The kernel's page
cache, not this process, holds what is read twice.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import blake3


class ImageError(RuntimeError):
    """The image cannot be opened or changed size while being read."""


class Image:
    """One volume image open for reading; blocks of ``block_size`` bytes, the last one short."""

    def __init__(self, path: str | Path, block_size: int) -> None:
        self.path = str(path)
        self.block_size = block_size
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ImageError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            mode = os.fstat(self.fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise ImageError(f"{self.path} is neither a file nor a block device")
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self.fd)
            raise
        self.block_count = -(-self.size // block_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advise_sequential(self) -> None:
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def prefetch(self, offset: int, length: int) -> None:
        """Ask the kernel to start reading this range now (the hash pass stays a few chunks
        ahead of itself: a cold disk then serves several requests at once)."""
        if hasattr(os, "posix_fadvise") and offset < self.size:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the image bytes at ``offset`` (ImageError if the image ends first)."""
        done, want = 0, len(view)
        while done < want:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise ImageError(
                    f"{self.path} ended at byte {offset + done}, it was {self.size} bytes long "
                    "when the push started"
                )
            done += got

    def read_blocks(
        self, indices: Sequence[int], buffer: bytearray | None = None
    ) -> tuple[bytearray, list[memoryview]]:
        """Read the blocks ``indices`` (ascending) into ``buffer`` (grown if too small, else
        reused); returns the buffer and one view per block (release them before reusing it)."""
        lengths = [self.block_length(i) for i in indices]
        total = sum(lengths)
        if buffer is None or len(buffer) < total:
            buffer = bytearray(total)
        whole = memoryview(buffer)
        views: list[memoryview] = []
        bs = self.block_size
        pos = run_pos = 0
        run_start = -1
        previous = -2
        for i, length in zip(indices, lengths, strict=True):
            if i != previous + 1:
                if run_start >= 0:
                    self.read_into(whole[run_pos:pos], run_start * bs)
                run_start, run_pos = i, pos
            views.append(whole[pos : pos + length])
            pos += length
            previous = i
        if run_start >= 0:
            self.read_into(whole[run_pos:pos], run_start * bs)
        whole.release()
        return buffer, views


def hash_blocks(view: memoryview, block_size: int) -> list[bytes]:
    """Record keys (BLAKE3-256) of the consecutive blocks in ``view``; the last may be short.

    The same function as `protocol.record_key`, inlined for the hot loop.
    """
    hasher = blake3.blake3
    return [
        hasher(view[start : start + block_size]).digest()
        for start in range(0, len(view), block_size)
    ]
