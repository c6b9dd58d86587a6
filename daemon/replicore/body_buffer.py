"""h11's receive buffer for the daemon's connections, handing request bodies on uncopied.

h11 appends every piece of received data to one bytearray, and takes a body's bytes out of it
by slicing it twice; Hypercorn then copies the slice into `bytes`. For a 1 MiB piece of a
record batch that is four copies and as many fresh 1 MiB allocations (about 0.65 CPU-s per
GiB on this project's benchmark machine). `PassingReceiveBuffer` keeps data that arrives
while the buffer is empty as the `bytes` it is, and a body read takes it whole, so the piece
reaches the app as the object the TLS layer produced. Everything else (request lines,
headers, chunked framing) goes through h11's own bytearray as before.
"""

from __future__ import annotations

from typing import Any

from h11._receivebuffer import ReceiveBuffer


class PassingReceiveBuffer(ReceiveBuffer):
    """h11's `ReceiveBuffer`, plus `_whole`: bytes received into an empty buffer, not yet
    copied into the bytearray (only a body read takes them without that copy)."""

    def __init__(self) -> None:
        super().__init__()
        self._whole: bytes | None = None

    def _settle(self) -> None:
        if self._whole is not None:
            self._data += self._whole
            self._whole = None

    def __iadd__(self, byteslike: bytes | bytearray) -> PassingReceiveBuffer:
        if self._whole is None and not self._data and type(byteslike) is bytes:
            self._whole = byteslike
        else:
            self._settle()
            self._data += byteslike
        return self

    def __len__(self) -> int:
        return len(self._data) + (len(self._whole) if self._whole is not None else 0)

    def __bytes__(self) -> bytes:
        self._settle()
        return super().__bytes__()

    def maybe_extract_at_most(self, count: int) -> Any:
        whole = self._whole
        if whole is None:
            return self._extract(count) if self._data else None
        self._whole = None
        if count >= len(whole):
            return whole
        self._data += memoryview(whole)[count:]
        return whole[:count]

    def maybe_extract_next_line(self) -> Any:
        self._settle()
        return super().maybe_extract_next_line()

    def maybe_extract_lines(self) -> Any:
        self._settle()
        return super().maybe_extract_lines()

    def is_next_line_obviously_invalid_request_line(self) -> bool:
        self._settle()
        return super().is_next_line_obviously_invalid_request_line()


def install(connection: Any) -> bool:
    """Give an h11 `Connection` that has received nothing yet a `PassingReceiveBuffer`;
    False (and nothing changed) if it is not one, or h11's internals are not as expected."""
    current = getattr(connection, "_receive_buffer", None)
    if type(current) is not ReceiveBuffer or len(current):
        return False
    connection._receive_buffer = PassingReceiveBuffer()
    return True
