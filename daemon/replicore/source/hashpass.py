"""The hash pass of a push: one sequential read of a volume image, its blocks hashed into the
key list, handed out in batches for the key negotiation.

It needs no connection and no session, so `replicore push` starts it for the first volume
before it loads its TLS stack: the read of the image, which bounds a push that sends little,
then starts as soon as the interpreter is up. It runs on threads of its own, at most
`KEYS_AHEAD_BYTES` of image ahead of whoever takes its batches, and stops when cancelled.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .. import protocol
from .reader import Image, hash_blocks

#: Image bytes read and hashed at once.
READ_CHUNK = 8 * 1024 * 1024
#: Chunks the kernel is asked to read ahead of the pass.
PREFETCH_CHUNKS = 2
#: Threads hashing one chunk (BLAKE3 releases the GIL).
HASH_THREADS = 2
#: Image bytes the pass may run ahead of the negotiation (their key entries wait in memory,
#: about 170 bytes per block): a slow answer from the target then does not stall the read of
#: the image.
KEYS_AHEAD_BYTES = 512 * 1024 * 1024
#: Image bytes whose key entries go in one batch: at least KEYS_BATCH_BYTES, at most a
#: KEYS_BATCHES_PER_IMAGE-th of the image (the first batch is half as big, so sending starts
#: early). Small enough that the batch left to negotiate once the image is read is short (its
#: missing records and the commit are all that follow the read), few enough that a large
#: image does not pay the target's per-request work thousands of times.
KEYS_BATCH_BYTES = 64 * 1024 * 1024
KEYS_BATCHES_PER_IMAGE = 16
#: Key entries of a batch whatever the block size.
MIN_KEYS_BATCH = 64
MAX_KEYS_BATCH = 16384


class Cancelled(Exception):
    """The pass was cancelled (raised to whoever was waiting on it)."""


class HashPass:
    """Reads and hashes `image` on a thread of its own once `start`ed; `take` the batches."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.checksum = protocol.KeyListChecksum()
        #: Blocks hashed once the pass is over (`take` answered None).
        self.key_count = 0
        self.bytes_read = 0
        self._ahead = max(1, KEYS_AHEAD_BYTES // image.block_size)
        self._batches: deque[list[protocol.KeyEntry]] = deque()
        self._queued = 0  # key entries in _batches
        self._finished = False
        self._cancelled = False
        self._error: BaseException | None = None
        self._on_read: Callable[[int], None] | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        #: time.monotonic() when the pass started.
        self.started_at = 0.0

    @classmethod
    def started(cls, image: Image) -> HashPass:
        hash_pass = cls(image)
        hash_pass.start()
        return hash_pass

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="push-hasher", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Key entries hashed and not taken yet."""
        return self._queued

    def report_reads(self, on_read: Callable[[int], None]) -> None:
        """Call `on_read(bytes)` for every chunk read from now on, and once now for the bytes
        read so far."""
        with self._changed:
            self._on_read = on_read
            done = self.bytes_read
        if done:
            on_read(done)

    def take(self) -> list[protocol.KeyEntry] | None:
        """The next key batch in block order, waiting for it; None once the image is all
        hashed (to every caller). Raises the pass's own error, or Cancelled."""
        with self._changed:
            while not self._batches:
                if self._error is not None:
                    raise self._error
                if self._cancelled:
                    raise Cancelled
                if self._finished:
                    return None
                self._changed.wait()
            batch = self._batches.popleft()
            self._queued -= len(batch)
            self._changed.notify_all()
            return batch

    def cancel(self) -> None:
        """Stop the pass and wait for its thread (idempotent)."""
        with self._changed:
            self._cancelled = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()

    # -- the pass's own thread ---------------------------------------------------------

    def _put(self, batch: list[protocol.KeyEntry]) -> None:
        with self._changed:
            while self._queued and self._queued + len(batch) > self._ahead:
                if self._cancelled:
                    raise Cancelled
                self._changed.wait()
            self._batches.append(batch)
            self._queued += len(batch)
            self._changed.notify_all()

    def _read(self, nbytes: int) -> None:
        with self._changed:
            if self._cancelled:
                raise Cancelled
            self.bytes_read += nbytes
            on_read = self._on_read
        if on_read is not None:
            on_read(nbytes)

    def _run(self) -> None:
        try:
            self._hash()
        except Cancelled:
            pass
        except BaseException as error:
            with self._changed:
                self._error = error
                self._changed.notify_all()
        else:
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    def _hash(self) -> None:
        """Chunk k+1 is read while the workers hash chunk k (two buffers); its key entries
        then go to the batches in index order."""
        image, bs, size = self.image, self.image.block_size, self.image.size
        image.advise_sequential()
        chunk_blocks = max(1, READ_CHUNK // bs)
        buffers = [memoryview(bytearray(chunk_blocks * bs)) for _ in range(2)]
        batch: list[protocol.KeyEntry] = []
        batch_bytes = max(KEYS_BATCH_BYTES, size // KEYS_BATCHES_PER_IMAGE)
        full = min(max(batch_bytes // bs, MIN_KEYS_BATCH), MAX_KEYS_BATCH)
        limit = full // 2
        checksum = self.checksum
        pending: deque[tuple[int, int, list[Future[list[bytes]]]]] = deque()

        def take_oldest() -> None:
            nonlocal batch, limit
            first, nbytes, futures = pending.popleft()
            index = first
            for future in futures:
                for key in future.result():
                    checksum.update(index, key)
                    batch.append(protocol.KeyEntry(index, key, min(bs, size - index * bs)))
                    index += 1
                    if len(batch) >= limit:
                        self._put(batch)
                        batch = []
                        limit = full
            self._read(nbytes)

        with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="push-hash") as workers:
            for n, first in enumerate(range(0, image.block_count, chunk_blocks)):
                start = first * bs
                nbytes = min(chunk_blocks * bs, size - start)
                image.prefetch(start + chunk_blocks * bs, PREFETCH_CHUNKS * chunk_blocks * bs)
                view = buffers[n % 2][:nbytes]
                image.read_into(view, start)
                if len(pending) == 1:
                    take_oldest()  # frees the other buffer before it is read into
                blocks = -(-nbytes // bs)
                share = -(-blocks // HASH_THREADS) * bs
                futures = [
                    workers.submit(hash_blocks, view[at : at + share], bs)
                    for at in range(0, nbytes, share)
                ]
                pending.append((first, nbytes, futures))
            while pending:
                take_oldest()
        self.key_count = image.block_count
        if batch:
            self._put(batch)
