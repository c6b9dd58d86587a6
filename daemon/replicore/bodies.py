"""Reading request bodies: JSON into typed structs (msgspec) with errors that name the field.

Malformed JSON is 400; a missing field, wrong type or bad value is 422 naming the field
(`$.agentId`-style path without the `$.`); a body over the limit is 413 (Quart enforces
MAX_CONTENT_LENGTH while buffering, and we check Content-Length first).
"""

from __future__ import annotations

import contextlib
import re
from typing import Annotated, TypeVar

import msgspec
from quart import request

from .errors import BadRequest, PayloadTooLarge, Unprocessable
from .store.db import MAX_STORED_INT

T = TypeVar("T")

#: A count or a size in bytes that a request reports and the store keeps.
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_STORED_INT)]

_AT_PATH = re.compile(r" - at `\$(.*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def _field_of(message: str) -> str | None:
    path = None
    found = _AT_PATH.search(message)
    if found:
        path = found.group(1).lstrip(".")
    missing = _MISSING.search(message)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None


async def raw_body(limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        # Read (within the app's MAX_CONTENT_LENGTH) what the client is sending anyway, so that
        # it reads this answer instead of a connection reset.
        with contextlib.suppress(Exception):
            await request.get_data(cache=False)
        raise PayloadTooLarge(f"body of {length} bytes is over the limit of {limit} bytes")
    data = await request.get_data(cache=False, as_text=False)
    if len(data) > limit:
        raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
    return data


def decode_json(data: bytes, type_: type[T]) -> T:
    if not data.strip():
        raise BadRequest("request body is empty; a JSON object is expected")
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as error:
        message = str(error)
        raise Unprocessable(message, field=_field_of(message)) from None
    except msgspec.DecodeError as error:
        raise BadRequest(f"malformed JSON: {error}") from None


async def json_body(type_: type[T], limit: int = 1024 * 1024) -> T:
    return decode_json(await raw_body(limit), type_)


class Struct(msgspec.Struct, rename="camel", forbid_unknown_fields=False):
    """Base of request bodies: camelCase on the wire, as the original data contracts."""
