"""A disk that can lose power: an SQLite VFS (made the default while in use) that passes every
operation on to the real one, and remembers for each file what a power cut would leave of it.

Each file's history is its bytes as of its last sync plus the writes and truncations since.
`cut(rng, into)`, or `cut_at_write` in the middle of whatever is writing, writes for every
file the synced bytes with a random subset of the later operations applied (in order: the
disk may have written some of them, in any order) into another directory, where the test
opens what a restarted daemon would find. Syncs made below
SQLite (`os.fdatasync` of the log by `store.checkpointer.sync_file`) are reported through
`tracking(sync_file)`. The shared-memory index (`-shm`) is not a file SQLite keeps across a
restart, so it is not copied; directories are taken as always durable.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw

Operation = tuple[int, bytes] | tuple[int, None]  # a write (offset, data); a truncate (size, None)


def _apply(content: bytearray, operation: Operation) -> None:
    offset, data = operation
    if data is None:
        del content[offset:]
        return
    if len(content) < offset:
        content.extend(bytes(offset - len(content)))
    content[offset : offset + len(data)] = data


class PowerCutDisk(apsw.VFS):
    """The default VFS while registered; `unregister()` when done."""

    def __init__(self) -> None:
        self.base = apsw.vfs_names()[0]
        self.lock = threading.Lock()
        self.synced_bytes: dict[str, bytearray] = {}
        self.pending: dict[str, list[Operation]] = {}
        self._trigger: tuple[str, int, random.Random, Path, float] | None = None
        self.cut_taken = threading.Event()
        super().__init__("power-cut", self.base, makedefault=True)

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        if path is not None:
            with self.lock:
                if path not in self.synced_bytes:
                    existing = Path(path).read_bytes() if os.path.exists(path) else b""
                    self.synced_bytes[path] = bytearray(existing)
                    self.pending[path] = []
        return _File(self, path, name, flags)

    def note(self, path: str, operation: Operation) -> None:
        self.pending[path].append(operation)

    def issued(self, path: str) -> int:
        """Operations on `path` so far (for `synced`)."""
        with self.lock:
            return len(self.pending.get(path, ()))

    def synced(self, path: str, issued: int) -> None:
        """The first `issued` operations on `path` since its last sync are on the disk (a
        sync covers what was issued before it started)."""
        with self.lock:
            content = self.synced_bytes.get(path)
            if content is None:
                return
            operations = self.pending[path]
            for operation in operations[:issued]:
                _apply(content, operation)
            self.pending[path] = operations[issued:]

    def tracking(self, sync_file: Callable[[str], None]) -> Callable[[str], None]:
        """`sync_file(path)` (a sync below SQLite), reported to this disk."""

        def tracked(path: str) -> None:
            issued = self.issued(path)
            sync_file(path)
            self.synced(path, issued)

        return tracked

    def unsynced_operations(self) -> int:
        with self.lock:
            return sum(len(operations) for operations in self.pending.values())

    def cut(self, rng: random.Random, into: Path, keep: float = 0.5) -> None:
        """Write what the disk holds after a power cut into the directory `into` (each file
        under its own name): the synced bytes, then each later operation with probability
        `keep`."""
        with self.lock:
            self._cut(rng, into, keep)

    def cut_at_write(
        self, name: str, count: int, rng: random.Random, into: Path, keep: float = 0.5
    ) -> None:
        """Arm a cut (as `cut`) right after the `count`-th write from now to the file called
        `name`, whoever writes it; `cut_taken` is set once it happened."""
        with self.lock:
            self._trigger = (name, count, rng, into, keep)

    def _after_write(self, path: str) -> None:
        if self._trigger is None or Path(path).name != self._trigger[0]:
            return
        name, count, rng, into, keep = self._trigger
        if count > 1:
            self._trigger = (name, count - 1, rng, into, keep)
            return
        self._trigger = None
        self._cut(rng, into, keep)
        self.cut_taken.set()

    def _cut(self, rng: random.Random, into: Path, keep: float) -> None:
        into.mkdir(parents=True, exist_ok=True)
        for path, synced in self.synced_bytes.items():
            if not os.path.exists(path) and not self.pending[path]:
                continue  # deleted
            content = bytearray(synced)
            for operation in self.pending[path]:
                if rng.random() < keep:
                    _apply(content, operation)
            (into / Path(path).name).write_bytes(bytes(content))


class _File(apsw.VFSFile):
    def __init__(self, disk: PowerCutDisk, path: str | None, name: Any, flags: list[int]) -> None:
        self.disk = disk
        self.path = path
        super().__init__(disk.base, name, flags)

    def xWrite(self, data: bytes, offset: int) -> None:
        if self.path is None:
            super().xWrite(data, offset)
            return
        with self.disk.lock:
            super().xWrite(data, offset)
            self.disk.note(self.path, (offset, bytes(data)))
            self.disk._after_write(self.path)

    def xTruncate(self, size: int) -> None:
        if self.path is None:
            super().xTruncate(size)
            return
        with self.disk.lock:
            super().xTruncate(size)
            self.disk.note(self.path, (size, None))

    def xSync(self, flags: int) -> None:
        if self.path is None:
            super().xSync(flags)
            return
        issued = self.disk.issued(self.path)
        super().xSync(flags)
        self.disk.synced(self.path, issued)
