"""Reading a whole volume image back fast, for `replicore export`: the image in order, in
chunks of contiguous bytes, every block checked against its key.

`read_chunks(conn, image_id)` yields `Chunk`s: `data` is the image's bytes from block `start`
on, exactly (the last chunk ends at the image's size), a view of a page-aligned buffer that is
reused once the consumer asks for the next chunk; `runs` are the (begin, end) offsets in
`data` of the blocks that are not all zero (a block whose key is the key of a zero block is
known without reading its record, so a writer can leave a hole there).

The work overlaps on a 2-core machine: one thread resolves the block map and reads the
stored records of the next chunk (SQLite incremental blob reads straight into the chunk's
buffer, in the order the records are stored: an uncompressed record lands in its block's
place); a small pool decompresses the others into place and hashes every block to compare it
with its key (zstd and BLAKE3 release the GIL), then calls `each(chunk)` (the export writes
the chunk there, so writes overlap too); the consumer takes the chunks in image order. At
most `AHEAD` chunks are in flight and their buffers are recycled, so memory stays flat
whatever the image's size.

Errors are those of `images.read_image`: OrphanedImage before anything is yielded for a broken
chain, DamagedImage naming the block whose key, record or bytes are missing or wrong. The
connection is used by the reading thread alone until the iterator is exhausted or closed;
run it inside one read transaction for a consistent snapshot.
"""

from __future__ import annotations

import contextlib
import mmap
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import apsw
import blake3

from .. import protocol
from . import images, records

#: Bytes of blocks per chunk (the unit of reading, of work on the pool and of writing).
CHUNK_BYTES = 4 * 1024 * 1024
#: Chunks read ahead of the consumer.
AHEAD = 6
#: Threads decompressing and checking blocks (and running `each`).
THREADS = 3


class Chunk(NamedTuple):
    """Image bytes from block `start` on, and where in them the non-zero blocks are."""

    start: int
    data: memoryview
    #: (begin, end) offsets in `data` of runs of consecutive blocks that are not all zero.
    runs: list[tuple[int, int]]


class _Record(NamedTuple):
    """How to get a block's bytes in place: a zstd frame to decompress (`frame`), or None
    when the reader already put the stored bytes there."""

    codec: int
    raw_length: int
    frame: memoryview | None


class _Job(NamedTuple):
    start: int
    buffers: _Buffers
    #: Per block: its key and its record, or None when the block is all zero.
    blocks: list[tuple[bytes, _Record | None]]


class _Buffers:
    """A chunk's output (page-aligned, for direct I/O) and its compressed records."""

    def __init__(self, size: int) -> None:
        self.out = mmap.mmap(-1, size)
        self.view = memoryview(self.out)
        self.frames = bytearray()


_END = object()


def zero_key(length: int) -> bytes:
    """The key of a block of `length` zero bytes."""
    return protocol.record_key(bytes(length))


class _Reader:
    def __init__(self, conn: apsw.Connection, image: dict[str, Any]) -> None:
        self.conn = conn
        self.name = images.name(image)
        self.size, self.block_size = image["size"], image["block_size"]
        self.count = image["block_count"]
        chain, missing = images.chain(conn, image)
        if missing is not None:
            raise images.OrphanedImage(images.orphan_reason(conn, image["id"]) or "orphaned image")
        self.chain = chain
        self.step = max(1, CHUNK_BYTES // self.block_size)
        last = images.block_length(self.size, self.block_size, self.count - 1)
        self.zero_keys = {zero_key(self.block_size), zero_key(last)}
        self.zeros = memoryview(bytes(self.block_size))
        #: (repository, key) of zero records known to be stored (checked once each).
        self.zero_present: set[tuple[int, bytes]] = set()
        self.blob: apsw.Blob | None = None

    def close(self) -> None:
        if self.blob is not None:
            self.blob.close()
            self.blob = None

    def length(self, index: int) -> int:
        return images.block_length(self.size, self.block_size, index)

    def damaged(self, index: int, what: str) -> images.DamagedImage:
        return images.DamagedImage(f"volume image {self.name}: the record of block {index} {what}")

    def read(self, start: int, stop: int, buffers: _Buffers) -> _Job:
        """Resolve blocks [start, stop) and read their records into `buffers` (reading thread)."""
        resolved = images.resolve(self.conn, self.chain, start, stop)
        if len(resolved) != stop - start:
            absent = next(i for i in range(start, stop) if i not in resolved)
            raise images.DamagedImage(f"volume image {self.name} has no key for block {absent}")
        # The first block of each record (a record used twice is read once, copied after).
        first: dict[tuple[int, bytes], int] = {}
        for index in range(start, stop):
            key, repository_id = resolved[index]
            if key not in self.zero_keys:
                first.setdefault((repository_id, key), index)
            elif (repository_id, key) not in self.zero_present:
                if not records.present_keys(self.conn, repository_id, [key]):
                    raise self.damaged(index, "is missing")
                self.zero_present.add((repository_id, key))
        wanted: dict[int, list[bytes]] = {}
        for repository_id, key in first:
            wanted.setdefault(repository_id, []).append(key)
        located = sorted(
            (place, repository_id, key)
            for repository_id, keys in wanted.items()
            for key, place in records.locate(self.conn, repository_id, keys).items()
        )
        frames_size = sum(p.stored_length for p, _, _ in located if p.codec != protocol.CODEC_RAW)
        if len(buffers.frames) < frames_size:
            buffers.frames = bytearray(frames_size)
        frames = memoryview(buffers.frames)
        got: dict[tuple[int, bytes], _Record] = {}
        at = 0
        for place, repository_id, key in located:
            index = first[(repository_id, key)]
            if place.raw_length != self.length(index):
                raise self.damaged(index, "does not match its key")
            if self.blob is None:
                self.blob = records.open_data(self.conn, place.rowid)
            else:
                self.blob.reopen(place.rowid)
            if place.codec == protocol.CODEC_RAW:
                if place.stored_length != place.raw_length:
                    raise self.damaged(index, "is damaged: its length is wrong")
                offset = (index - start) * self.block_size
                self.blob.read_into(buffers.view, offset, place.stored_length)
                got[(repository_id, key)] = _Record(place.codec, place.raw_length, None)
            else:
                self.blob.read_into(frames, at, place.stored_length)
                frame = frames[at : at + place.stored_length]
                got[(repository_id, key)] = _Record(place.codec, place.raw_length, frame)
                at += place.stored_length
        blocks: list[tuple[bytes, _Record | None]] = []
        for index in range(start, stop):
            key, repository_id = resolved[index]
            if key in self.zero_keys:
                blocks.append((key, None))
                continue
            record = got.get((repository_id, key))
            if record is None:
                raise self.damaged(index, "is missing")
            blocks.append((key, record))
        return _Job(start, buffers, blocks)

    def decode(self, job: _Job) -> Chunk:
        """Put every block of a job in place and check it against its key (pool thread)."""
        view = job.buffers.view
        placed: dict[bytes, memoryview] = {}
        runs: list[tuple[int, int]] = []
        offset = 0
        for index, (key, record) in enumerate(job.blocks, job.start):
            length = self.length(index)
            end = offset + length
            place = view[offset:end]
            if record is None:
                place[:] = self.zeros[:length]
            elif key in placed:
                if len(placed[key]) != length:
                    raise self.damaged(index, "does not match its key")
                place[:] = placed[key]
            else:
                if record.frame is not None:
                    try:
                        data = protocol.decompress_record(
                            record.codec, record.frame, record.raw_length
                        )
                    except protocol.ProtocolError as error:
                        raise self.damaged(index, f"is damaged: {error}") from None
                    place[:] = data
                if blake3.blake3(place).digest() != key:
                    raise self.damaged(index, "does not match its key")
                placed[key] = place
            if record is not None:
                if runs and runs[-1][1] == offset:
                    runs[-1] = (runs[-1][0], end)
                else:
                    runs.append((offset, end))
            offset = end
        return Chunk(job.start, view[:offset], runs)


class _Stopped(Exception):
    """A job skipped because the consumer is gone."""


class _Task:
    """A job on the pool, and its outcome once `done` is set."""

    __slots__ = ("chunk", "done", "error", "job")

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.done = threading.Event()
        self.chunk: Chunk | None = None
        self.error: BaseException | None = None


def read_chunks(
    conn: apsw.Connection,
    image_id: int,
    *,
    threads: int = THREADS,
    each: Callable[[Chunk], None] | None = None,
) -> Iterator[Chunk]:
    """The image in order, in chunks (see the module's docstring). `each` is called with
    every chunk on the pool thread that decoded it, in no particular order, before the chunk
    is yielded. Close the iterator (or exhaust it) to stop its threads."""
    reader = _Reader(conn, images.get(conn, image_id))
    #: Buffers the consumer is done with (None: stop). AHEAD + 3 exist: AHEAD queued, one
    #: being read, one being queued, one with the consumer.
    free: queue.Queue[_Buffers | None] = queue.Queue()
    for _ in range(AHEAD + 3):
        free.put(_Buffers(reader.step * reader.block_size))
    pending: queue.Queue[Any] = queue.Queue(maxsize=AHEAD)  # tasks in image order
    jobs: queue.Queue[_Task | None] = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        while (task := jobs.get()) is not None:
            try:
                if stop.is_set():
                    raise _Stopped  # nobody waits for it any more
                task.chunk = reader.decode(task.job)
                if each is not None:
                    each(task.chunk)
            except BaseException as error:  # handed to the consumer, raised there
                task.error = error
            finally:
                task.done.set()

    def produce() -> None:
        try:
            for start in range(0, reader.count, reader.step):
                buffers = free.get()
                if buffers is None or stop.is_set():
                    return
                task = _Task(reader.read(start, min(reader.count, start + reader.step), buffers))
                jobs.put(task)
                pending.put(task)
            pending.put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            pending.put(error)
        finally:
            reader.close()

    workers = [
        threading.Thread(target=work, name=f"image-decode-{n}", daemon=True) for n in range(threads)
    ]
    producer = threading.Thread(target=produce, name="image-read", daemon=True)
    for thread in (*workers, producer):
        thread.start()
    try:
        while (item := pending.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            item.done.wait()
            if item.error is not None:
                raise item.error
            yield item.chunk
            free.put(item.job.buffers)
    finally:
        stop.set()
        free.put(None)
        while producer.is_alive():  # let a producer blocked on a full queue finish
            with contextlib.suppress(queue.Empty):
                pending.get(timeout=0.05)
        producer.join()
        for _ in workers:
            jobs.put(None)
        for thread in workers:
            thread.join()
