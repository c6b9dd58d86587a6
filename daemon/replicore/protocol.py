"""Binary framing of the replication data path (sans-I/O).

This module owns, and is the single definition of, the three binary bodies
exchanged on the data path of a replication session, shared by the target
server and the push client:

* the key list   (``RKY1``, request body of ``POST .../records/keys``),
* the missing answer (``RMS1``, response body of ``POST .../records/keys``),
* the record stream (``RRD1``, request body of ``POST .../records/rawdata``),

plus the record key (BLAKE3-256 of the uncompressed block), the per-record
zstd compression rules, the commit checksum over the key list, and the
protocol limits (module constants, enforced by the decoders).

It knows nothing of HTTP, trio or Quart.  In the style of h11 the decoders
take bytes in and hand events out; "not enough data yet" is an answer
(``None``), not an exception.  Every malformed input raises
:class:`ProtocolError` and nothing else.  Session-level checks (duplicate
block indices, indices beyond the image, record key versus payload) are the
server's job, not this module's.  The byte-by-byte description is
``docs/protocol.md``.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import starmap
from typing import NamedTuple

import blake3
import zstandard

__all__ = [
    "CODEC_RAW",
    "CODEC_ZSTD",
    "DEFAULT_BLOCK_SIZE",
    "FRAME_HEADER_SIZE",
    "KEYS_MAGIC",
    "KEY_ENTRY_SIZE",
    "KEY_SIZE",
    "MAX_BLOCK_SIZE",
    "MAX_KEYS_BATCH_BYTES",
    "MAX_KEYS_PER_BATCH",
    "MAX_RAWDATA_BATCH_BYTES",
    "MAX_RECORDS_PER_BATCH",
    "MAX_STORED_LENGTH",
    "MAX_ZSTD_WINDOW_SIZE",
    "MIN_BLOCK_SIZE",
    "MISSING_MAGIC",
    "RECORDS_MAGIC",
    "KeyEntry",
    "KeyListChecksum",
    "KeyListDecoder",
    "ProtocolError",
    "RecordFrame",
    "RecordStreamDecoder",
    "check_block_size",
    "compress_block",
    "decode_keys",
    "decode_missing",
    "decompress_record",
    "encode_keys",
    "encode_missing",
    "encode_record",
    "encode_record_header",
    "encode_records_header",
    "iter_records",
    "record_key",
]

# --------------------------------------------------------------------------
# Constants and limits
# --------------------------------------------------------------------------

KEYS_MAGIC = b"RKY1"
MISSING_MAGIC = b"RMS1"
RECORDS_MAGIC = b"RRD1"

KEY_SIZE = 32  #: BLAKE3-256 digest size
CODEC_RAW = 0  #: payload is the block itself
CODEC_ZSTD = 1  #: payload is one zstd frame

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1024 * 1024
DEFAULT_BLOCK_SIZE = 64 * 1024
MAX_KEYS_PER_BATCH = 65536
MAX_RECORDS_PER_BATCH = 4096
#: zstd worst-case expansion margin on top of the largest block.
MAX_STORED_LENGTH = MAX_BLOCK_SIZE + 64 * 1024
MAX_RAWDATA_BATCH_BYTES = 32 * 1024 * 1024
#: Largest zstd Window_Size a record's frame may declare.
MAX_ZSTD_WINDOW_SIZE = 8 * 1024 * 1024

_HEADER = struct.Struct(">4sI")  # magic, count
_KEY_ENTRY = struct.Struct(">Q32sI")  # block index, key, raw length
_FRAME = struct.Struct(">Q32sIIB")  # index, key, raw length, stored length, codec
_U64 = struct.Struct(">Q")
_INDEX_KEY = struct.Struct(">Q32s")

HEADER_SIZE = _HEADER.size  # 8
KEY_ENTRY_SIZE = _KEY_ENTRY.size  # 44
FRAME_HEADER_SIZE = _FRAME.size  # 49
MAX_KEYS_BATCH_BYTES = HEADER_SIZE + KEY_ENTRY_SIZE * MAX_KEYS_PER_BATCH

_MAX_U64 = (1 << 64) - 1


# --------------------------------------------------------------------------
# Errors and events
# --------------------------------------------------------------------------


class ProtocolError(ValueError):
    """A body violates the data-path framing or its limits.

    ``offset`` is the byte offset in the body of the offending field (or
    where more data was expected); ``index`` is the block index concerned,
    when known.
    """

    message: str
    offset: int | None
    index: int | None

    def __init__(self, message: str, *, offset: int | None = None, index: int | None = None):
        self.message = message
        self.offset = offset
        self.index = index
        details = []
        if offset is not None:
            details.append(f"offset {offset}")
        if index is not None:
            details.append(f"block {index}")
        super().__init__(f"{message} ({', '.join(details)})" if details else message)


class KeyEntry(NamedTuple):
    """One entry of a key list: block ``index`` has record ``key`` of ``length`` bytes."""

    index: int
    key: bytes
    length: int


class RecordFrame(NamedTuple):
    """One frame of a record stream (payload still compressed if ``codec`` is 1)."""

    index: int
    key: bytes
    raw_length: int
    codec: int
    payload: bytes | memoryview


# --------------------------------------------------------------------------
# Keys, block sizes, checksum
# --------------------------------------------------------------------------


def record_key(data: bytes | memoryview) -> bytes:
    """Return the record key of a block: BLAKE3-256 of its uncompressed bytes."""
    return blake3.blake3(data).digest()


def check_block_size(n: int) -> None:
    """Raise ProtocolError unless ``n`` is a power of two in [MIN_BLOCK_SIZE, MAX_BLOCK_SIZE]."""
    if (
        not isinstance(n, int)
        or isinstance(n, bool)
        or not MIN_BLOCK_SIZE <= n <= MAX_BLOCK_SIZE
        or n & (n - 1)
    ):
        raise ProtocolError(
            f"block size {n!r} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )


class KeyListChecksum:
    """Commit checksum: BLAKE3-256 over ``u64 index || key`` of every key entry of a
    session, in ascending block index order.

    Entries must be added in strictly ascending index order (ValueError otherwise);
    callers that receive batches out of order must sort first.
    """

    def __init__(self) -> None:
        self._hasher = blake3.blake3()
        self._last: int | None = None
        self._count = 0

    @property
    def count(self) -> int:
        """Number of entries added so far."""
        return self._count

    def update(self, index: int, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
        if not 0 <= index <= _MAX_U64:
            raise ValueError(f"block index {index} out of u64 range")
        if self._last is not None and index <= self._last:
            raise ValueError(f"block index {index} not above previous index {self._last}")
        self._hasher.update(_INDEX_KEY.pack(index, key))
        self._last = index
        self._count += 1

    def update_ascending(self, entries: Sequence[tuple[int, bytes]]) -> None:
        """Add `(index, key)` entries known to be valid and in strictly ascending order (rows
        read in primary-key order from a table of checked entries), in one hash update; only
        their place after the entries added before is checked."""
        if not entries:
            return
        if self._last is not None and entries[0][0] <= self._last:
            raise ValueError(f"block index {entries[0][0]} not above previous index {self._last}")
        self._hasher.update(b"".join(starmap(_INDEX_KEY.pack, entries)))
        self._last = entries[-1][0]
        self._count += len(entries)

    def digest(self) -> bytes:
        return self._hasher.digest()

    def hexdigest(self) -> str:
        """Lowercase hex of the 32-byte checksum (64 characters)."""
        return self._hasher.hexdigest()


# --------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------


def _check_entry(index: int, key: bytes, length: int, max_length: int) -> None:
    if not 0 <= index <= _MAX_U64:
        raise ProtocolError(f"block index {index} out of u64 range")
    if len(key) != KEY_SIZE:
        raise ProtocolError(f"key must be {KEY_SIZE} bytes, got {len(key)}", index=index)
    if not 1 <= length <= max_length:
        raise ProtocolError(f"length {length} not in 1..{max_length}", index=index)


def encode_keys(entries: Iterable[KeyEntry]) -> bytes:
    """Encode one key-list batch (``RKY1``)."""
    parts: list[bytes] = []
    for index, key, length in entries:
        _check_entry(index, key, length, MAX_BLOCK_SIZE)
        parts.append(_KEY_ENTRY.pack(index, bytes(key), length))
    if len(parts) > MAX_KEYS_PER_BATCH:
        raise ProtocolError(f"{len(parts)} keys in one batch, limit is {MAX_KEYS_PER_BATCH}")
    return _HEADER.pack(KEYS_MAGIC, len(parts)) + b"".join(parts)


def encode_missing(indices: Iterable[int]) -> bytes:
    """Encode a missing answer (``RMS1``) listing block indices."""
    idx = list(indices)
    if len(idx) > MAX_KEYS_PER_BATCH:
        raise ProtocolError(f"{len(idx)} indices in one answer, limit is {MAX_KEYS_PER_BATCH}")
    for i in idx:
        if not 0 <= i <= _MAX_U64:
            raise ProtocolError(f"block index {i} out of u64 range")
    return _HEADER.pack(MISSING_MAGIC, len(idx)) + struct.pack(f">{len(idx)}Q", *idx)


def decode_missing(body: bytes | memoryview) -> list[int]:
    """Decode a whole missing answer (``RMS1``); strict about magic and length."""
    if len(body) < HEADER_SIZE:
        raise ProtocolError(
            f"missing answer of {len(body)} bytes is shorter than its header", offset=len(body)
        )
    magic, count = _HEADER.unpack_from(body, 0)
    if magic != MISSING_MAGIC:
        raise ProtocolError(f"bad magic {magic!r}, expected {MISSING_MAGIC!r}", offset=0)
    if count > MAX_KEYS_PER_BATCH:
        raise ProtocolError(f"count {count} exceeds {MAX_KEYS_PER_BATCH}", offset=4)
    expected = HEADER_SIZE + 8 * count
    if len(body) != expected:
        raise ProtocolError(
            f"missing answer is {len(body)} bytes, count {count} requires {expected}",
            offset=min(len(body), expected),
        )
    return list(struct.unpack_from(f">{count}Q", body, HEADER_SIZE))


def encode_records_header(count: int) -> bytes:
    """Encode the 8-byte header of a record stream (``RRD1``) announcing ``count`` frames."""
    if not 0 <= count <= MAX_RECORDS_PER_BATCH:
        raise ProtocolError(f"record count {count} not in 0..{MAX_RECORDS_PER_BATCH}")
    return _HEADER.pack(RECORDS_MAGIC, count)


def encode_record_header(index: int, key: bytes, raw_length: int, codec: int, stored: int) -> bytes:
    """Encode the 49-byte header of a record frame whose payload is ``stored`` bytes."""
    _check_entry(index, key, raw_length, MAX_BLOCK_SIZE)
    if codec == CODEC_RAW:
        if stored != raw_length:
            raise ProtocolError(
                f"codec 0 payload is {stored} bytes, raw length is {raw_length}", index=index
            )
    elif codec == CODEC_ZSTD:
        if not 1 <= stored <= MAX_STORED_LENGTH:
            raise ProtocolError(
                f"stored length {stored} not in 1..{MAX_STORED_LENGTH}", index=index
            )
    else:
        raise ProtocolError(f"unknown codec {codec}", index=index)
    return _FRAME.pack(index, bytes(key), raw_length, stored, codec)


def encode_record(
    index: int, key: bytes, raw_length: int, codec: int, payload: bytes | memoryview
) -> bytes:
    """Encode one record frame: 49-byte frame header followed by ``payload``."""
    return encode_record_header(index, key, raw_length, codec, len(payload)) + bytes(payload)


# --------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------

_tls = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_tls, "cctx", None)
    if cache is None:
        cache = _tls.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=False
        )
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_tls, "dctx", None)
    if dctx is None:
        dctx = _tls.dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW_SIZE)
    return dctx


def compress_block(raw: bytes | memoryview, level: int = 1) -> tuple[int, bytes | memoryview]:
    """Compress one block: ``(CODEC_ZSTD, frame)`` if smaller, else ``(CODEC_RAW, raw)``
    (``raw`` itself, not a copy: copy it before reusing its buffer)."""
    if not 1 <= len(raw) <= MAX_BLOCK_SIZE:
        raise ProtocolError(f"block of {len(raw)} bytes not in 1..{MAX_BLOCK_SIZE}")
    frame = _compressor(level).compress(raw)
    if len(frame) < len(raw):
        return CODEC_ZSTD, frame
    return CODEC_RAW, raw


def decompress_record(
    codec: int, payload: bytes | memoryview, raw_length: int
) -> bytes | memoryview:
    """Return the uncompressed block of a record (for codec 0 the payload itself, not a
    copy); ProtocolError if it is not exactly ``raw_length`` bytes or the payload is not a
    single valid zstd frame.

    Never allocates more than ``raw_length`` bytes of output.
    """
    if not 1 <= raw_length <= MAX_BLOCK_SIZE:
        raise ProtocolError(f"raw length {raw_length} not in 1..{MAX_BLOCK_SIZE}")
    if codec == CODEC_RAW:
        if len(payload) != raw_length:
            raise ProtocolError(f"codec 0 payload is {len(payload)} bytes, expected {raw_length}")
        return payload
    if codec != CODEC_ZSTD:
        raise ProtocolError(f"unknown codec {codec}")
    try:
        # A frame that declares its content size is decompressed into a buffer of
        # that size (max_output_size is ignored then): check it first.
        declared = zstandard.frame_content_size(payload)
        if declared not in (-1, raw_length):
            raise ProtocolError(f"zstd frame declares {declared} bytes, raw length is {raw_length}")
        out = _decompressor().decompress(
            payload, max_output_size=raw_length, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"bad zstd frame: {exc}") from None
    if len(out) != raw_length:
        raise ProtocolError(f"zstd frame decompressed to {len(out)} bytes, expected {raw_length}")
    return out


# --------------------------------------------------------------------------
# Incremental decoding
# --------------------------------------------------------------------------


class _ReceiveBuffer:
    """The body bytes fed so far and not yet read, as the chunks they arrived in.

    Reads are zero-copy views of a chunk; only bytes that straddle two chunks (a frame cut
    by a read boundary) are joined, by copying just those bytes. Chunks are kept as
    immutable ``bytes`` (a mutable buffer is copied when fed), so a view handed out stays
    valid whatever is fed later.
    """

    __slots__ = ("_chunks", "_len", "_offset", "_pos")

    def __init__(self) -> None:
        self._chunks: deque[bytes | memoryview] = deque()
        self._pos = 0  # read position in the first chunk
        self._len = 0  # unread bytes
        self._offset = 0  # body offset of the next unread byte

    def __len__(self) -> int:
        return self._len

    @property
    def offset(self) -> int:
        """Body offset of the next unread byte."""
        return self._offset

    @property
    def total(self) -> int:
        """Number of body bytes fed so far."""
        return self._offset + self._len

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes):
            data = memoryview(data).cast("B").tobytes()
        if data:
            self._chunks.append(data)
            self._len += len(data)

    def _front(self, n: int) -> memoryview:
        """A view of the next min(n, len) bytes, joining chunks only when they straddle."""
        n = min(n, self._len)
        chunks = self._chunks
        if not chunks:
            return memoryview(b"")
        first = chunks[0]
        if self._pos + n > len(first):
            joined = bytearray(memoryview(first)[self._pos :])
            chunks.popleft()
            while len(joined) < n:
                part = chunks[0]
                need = n - len(joined)
                if len(part) <= need:
                    joined += part
                    chunks.popleft()
                else:
                    joined += memoryview(part)[:need]
                    chunks[0] = memoryview(part)[need:]
            chunks.appendleft(bytes(joined))
            self._pos = 0
            first = chunks[0]
        return memoryview(first)[self._pos : self._pos + n]

    def prefix(self, n: int) -> bytes:
        return bytes(self._front(n))

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self._front(st.size))

    def view(self, n: int) -> memoryview:
        return self._front(n)

    def advance(self, n: int) -> None:
        self._len -= n
        self._offset += n
        pos = self._pos + n
        chunks = self._chunks
        while chunks and pos >= len(chunks[0]):
            pos -= len(chunks.popleft())
        self._pos = pos

    def take(self, n: int) -> memoryview:
        view = self._front(n)
        self.advance(n)
        return view


class _Decoder:
    _magic: bytes
    _what: str

    def __init__(self, max_count: int, limit: int, max_bytes: int) -> None:
        if not 0 <= max_count <= limit:
            raise ValueError(f"max_count must be in 0..{limit}")
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._buf = _ReceiveBuffer()
        self._count: int | None = None
        self._produced = 0  # entries/frames decoded (including queued ones)
        self._error: ProtocolError | None = None

    @property
    def count(self) -> int | None:
        """The count from the header, once the header has been read."""
        return self._count

    @property
    def done(self) -> bool:
        """True once the header and all ``count`` entries/frames have been decoded."""
        return self._count is not None and self._produced == self._count

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self._error = exc
        return exc

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append body bytes.  Raises ProtocolError if the body grows past its byte limit."""
        if self._error is not None:
            raise self._error
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if self._buf.total + n > self._max_bytes:
            raise self._fail(
                ProtocolError(
                    f"{self._what} exceeds {self._max_bytes} bytes", offset=self._max_bytes
                )
            )
        self._buf.feed(data)

    def _read_header(self) -> bool:
        buf = self._buf
        head = buf.prefix(4)
        if not self._magic.startswith(head):
            raise ProtocolError(f"bad magic {head!r}, expected {self._magic!r}", offset=0)
        if len(buf) < HEADER_SIZE:
            return False
        _, count = buf.unpack(_HEADER)
        if count > self._max_count:
            raise ProtocolError(f"count {count} exceeds {self._max_count}", offset=4)
        buf.advance(HEADER_SIZE)
        self._count = count
        return True

    def _check_trailing(self) -> None:
        if len(self._buf):
            raise ProtocolError(
                f"{len(self._buf)} trailing bytes after the last {self._what} entry",
                offset=self._buf.offset,
            )

    def _next(self) -> KeyEntry | RecordFrame | None:
        raise NotImplementedError

    def _has_queued(self) -> bool:
        return False

    def next_event(self) -> KeyEntry | RecordFrame | None:
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _truncation(self) -> ProtocolError:
        buf = self._buf
        if self._count is None:
            if buf.total == 0:
                return ProtocolError(f"empty {self._what} body", offset=0)
            return ProtocolError(
                f"body ended inside the header ({len(buf)} of {HEADER_SIZE} bytes)", offset=0
            )
        return ProtocolError(
            f"body ended after {self._produced} of {self._count} entries", offset=buf.offset
        )

    def finish(self) -> None:
        """Declare the end of the body.  Raises ProtocolError if it ended early or has
        trailing bytes.  Call it after next_event() returned None."""
        if self._error is not None:
            raise self._error
        if self._has_queued():
            raise RuntimeError("finish() called before all events were taken")
        try:
            event = self._next()
        except ProtocolError as exc:
            self._error = exc
            raise
        if event is not None:
            self._requeue(event)
            raise RuntimeError("finish() called before all events were taken")
        if not self.done:
            raise self._fail(self._truncation())
        self._check_trailing()

    def _requeue(self, event: KeyEntry | RecordFrame) -> None:
        raise NotImplementedError


class KeyListDecoder(_Decoder):
    """Incremental decoder of a key-list batch (``RKY1``); events are KeyEntry.

    Does not check for duplicate block indices (the server does).
    """

    _magic = KEYS_MAGIC
    _what = "key list"

    def __init__(
        self, max_count: int = MAX_KEYS_PER_BATCH, *, max_length: int = MAX_BLOCK_SIZE
    ) -> None:
        if not 1 <= max_length <= MAX_BLOCK_SIZE:
            raise ValueError(f"max_length must be in 1..{MAX_BLOCK_SIZE}")
        super().__init__(max_count, MAX_KEYS_PER_BATCH, HEADER_SIZE + KEY_ENTRY_SIZE * max_count)
        self._max_length = max_length
        self._queue: deque[KeyEntry] = deque()

    def _has_queued(self) -> bool:
        return bool(self._queue)

    def _requeue(self, event: KeyEntry | RecordFrame) -> None:
        assert isinstance(event, KeyEntry)
        self._queue.appendleft(event)

    def next_event(self) -> KeyEntry | None:  # type: ignore[override]
        if self._queue and self._error is None:
            return self._queue.popleft()
        event = super().next_event()
        assert event is None or isinstance(event, KeyEntry)
        return event

    def _next(self) -> KeyEntry | None:
        if self._queue:
            return self._queue.popleft()
        buf = self._buf
        if self._count is None and not self._read_header():
            return None
        assert self._count is not None
        if self._produced == self._count:
            self._check_trailing()
            return None
        n = min(self._count - self._produced, len(buf) // KEY_ENTRY_SIZE)
        if n == 0:
            return None
        start = buf.offset
        chunk = buf.view(n * KEY_ENTRY_SIZE)
        raw = list(_KEY_ENTRY.iter_unpack(chunk))
        del chunk
        good = n
        max_length = self._max_length
        for i, (_, _, length) in enumerate(raw):
            if not 1 <= length <= max_length:
                good = i
                break
        if good == 0:
            index, _, length = raw[0]
            raise ProtocolError(
                f"length {length} not in 1..{max_length}", offset=start + 40, index=index
            )
        buf.advance(good * KEY_ENTRY_SIZE)
        self._produced += good
        queue = self._queue
        queue.extend(map(KeyEntry._make, raw[:good] if good < n else raw))
        return queue.popleft()


class RecordStreamDecoder(_Decoder):
    """Incremental decoder of a record-stream batch (``RRD1``); events are RecordFrame.

    Length fields are validated as soon as a frame header is complete, before any
    payload byte is awaited.  Payloads are not decompressed and keys are not
    verified (use decompress_record and record_key); duplicate block indices are
    not checked (the server does).
    """

    _magic = RECORDS_MAGIC
    _what = "record stream"

    def __init__(
        self,
        max_count: int = MAX_RECORDS_PER_BATCH,
        max_raw: int = MAX_BLOCK_SIZE,
        *,
        max_bytes: int = MAX_RAWDATA_BATCH_BYTES,
    ) -> None:
        if not 1 <= max_raw <= MAX_BLOCK_SIZE:
            raise ValueError(f"max_raw must be in 1..{MAX_BLOCK_SIZE}")
        if not HEADER_SIZE <= max_bytes <= MAX_RAWDATA_BATCH_BYTES:
            raise ValueError(f"max_bytes must be in {HEADER_SIZE}..{MAX_RAWDATA_BATCH_BYTES}")
        super().__init__(max_count, MAX_RECORDS_PER_BATCH, max_bytes)
        self._max_raw = max_raw
        # (index, key, raw_length, codec, stored_length, frame offset) of a frame
        # whose header has been read but whose payload has not fully arrived.
        self._frame: tuple[int, bytes, int, int, int, int] | None = None
        self._requeued: RecordFrame | None = None

    def _has_queued(self) -> bool:
        return self._requeued is not None

    def _requeue(self, event: KeyEntry | RecordFrame) -> None:
        assert isinstance(event, RecordFrame)
        self._requeued = event

    def next_event(self) -> RecordFrame | None:  # type: ignore[override]
        if self._requeued is not None and self._error is None:
            event, self._requeued = self._requeued, None
            return event
        event = super().next_event()
        assert event is None or isinstance(event, RecordFrame)
        return event

    def _read_frame_header(self) -> bool:
        buf = self._buf
        if len(buf) < FRAME_HEADER_SIZE:
            return False
        start = buf.offset
        index, key, raw_length, stored, codec = buf.unpack(_FRAME)
        if codec not in (CODEC_RAW, CODEC_ZSTD):
            raise ProtocolError(f"unknown codec {codec}", offset=start + 48, index=index)
        if not 1 <= raw_length <= self._max_raw:
            raise ProtocolError(
                f"raw length {raw_length} not in 1..{self._max_raw}",
                offset=start + 40,
                index=index,
            )
        if codec == CODEC_RAW and stored != raw_length:
            raise ProtocolError(
                f"codec 0 stored length {stored} differs from raw length {raw_length}",
                offset=start + 44,
                index=index,
            )
        if codec == CODEC_ZSTD and not 1 <= stored <= MAX_STORED_LENGTH:
            raise ProtocolError(
                f"stored length {stored} not in 1..{MAX_STORED_LENGTH}",
                offset=start + 44,
                index=index,
            )
        if start + FRAME_HEADER_SIZE + stored > self._max_bytes:
            raise ProtocolError(
                f"frame would end past the {self._max_bytes}-byte batch limit",
                offset=start + 44,
                index=index,
            )
        buf.advance(FRAME_HEADER_SIZE)
        self._frame = (index, key, raw_length, codec, stored, start)
        return True

    def _next(self) -> RecordFrame | None:
        buf = self._buf
        if self._count is None and not self._read_header():
            return None
        assert self._count is not None
        if self._frame is None:
            if self._produced == self._count:
                self._check_trailing()
                return None
            if not self._read_frame_header():
                return None
        assert self._frame is not None
        index, key, raw_length, codec, stored, _ = self._frame
        if len(buf) < stored:
            return None
        payload = buf.take(stored)
        self._frame = None
        self._produced += 1
        return RecordFrame(index, key, raw_length, codec, payload)

    def _truncation(self) -> ProtocolError:
        if self._frame is not None:
            index, _, _, _, stored, start = self._frame
            return ProtocolError(
                f"body ended inside the payload ({len(self._buf)} of {stored} bytes)",
                offset=start,
                index=index,
            )
        if self._count is not None and len(self._buf):
            return ProtocolError(
                f"body ended inside a frame header ({len(self._buf)} of {FRAME_HEADER_SIZE} bytes)",
                offset=self._buf.offset,
            )
        return super()._truncation()


def decode_keys(body: bytes | memoryview, *, max_count: int = MAX_KEYS_PER_BATCH) -> list[KeyEntry]:
    """Decode a whole key-list body."""
    dec = KeyListDecoder(max_count)
    dec.feed(body)
    out: list[KeyEntry] = []
    while (entry := dec.next_event()) is not None:
        out.append(entry)
    dec.finish()
    return out


def iter_records(
    body: bytes | memoryview,
    *,
    max_count: int = MAX_RECORDS_PER_BATCH,
    max_raw: int = MAX_BLOCK_SIZE,
) -> Iterator[RecordFrame]:
    """Yield the frames of a whole record-stream body; errors surface lazily."""
    dec = RecordStreamDecoder(max_count, max_raw)
    dec.feed(body)
    while (frame := dec.next_event()) is not None:
        yield frame
    dec.finish()
