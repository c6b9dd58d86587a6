"""The request class of the app: a body that keeps the chunks as they arrived.

Quart's body appends every chunk Hypercorn hands on to one bytearray and copies it out
again on each read: two copies of every byte of a record batch, on the trio thread. Here the
chunks (immutable bytes) are queued and a handler iterating the body gets each one as it
is; only awaiting the whole body joins them. Limits and completion behave as in Quart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import Any

from quart_trio.wrappers.request import TrioBody, TrioRequest
from werkzeug.exceptions import RequestEntityTooLarge


class ChunkBody(TrioBody):
    def __init__(self, expected_content_length: int | None, max_content_length: int | None):
        super().__init__(expected_content_length, max_content_length)
        self._chunks: deque[bytes] = deque()
        self._buffered = 0

    async def __anext__(self) -> bytes:
        if self._must_raise is not None:
            raise self._must_raise
        if not self._complete.is_set():
            await self._has_data.wait()
        if not self._chunks:
            if self._must_raise is not None:
                raise self._must_raise
            raise StopAsyncIteration
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if not self._chunks:
            self._has_data.clear()
        return chunk

    def __await__(self) -> Generator[Any, None, Any]:
        if self._must_raise is not None:
            raise self._must_raise
        yield from self._complete.wait().__await__()
        if self._must_raise is not None:
            raise self._must_raise
        if len(self._chunks) > 1:
            self._chunks = deque([b"".join(self._chunks)])
        return self._chunks[0] if self._chunks else b""

    def append(self, data: bytes) -> None:
        if not data or self._must_raise is not None:
            return
        self._chunks.append(bytes(data))
        self._buffered += len(data)
        self._has_data.set()
        if self._max_content_length is not None and self._buffered > self._max_content_length:
            self._must_raise = RequestEntityTooLarge()
            self.set_complete()

    def clear(self) -> None:
        self._chunks.clear()
        self._buffered = 0


class Request(TrioRequest):
    body_class = ChunkBody
