"""Test helpers for upload sessions: open one, send a file in chunks with the offset header,
end it; used by the upload and Exchange DLL tests."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx

PREFIX = "slave/sessions"


def new_session(
    client: httpx.Client,
    data: bytes,
    file_name: str = "ese.dll",
    *,
    md5: str | None = None,
    purpose: str = "exchange-dll",
) -> str:
    response = client.post(
        "slave/newsession/",
        json={
            "fileName": file_name,
            "size": len(data),
            "md5": md5 or hashlib.md5(data).hexdigest(),
            "purpose": purpose,
        },
    )
    assert response.status_code == 201, response.text
    session_id: str = response.json()["uploadSessionId"]
    return session_id


def send_chunk(client: httpx.Client, session_id: str, offset: int, chunk: bytes) -> httpx.Response:
    return client.post(
        f"{PREFIX}/{session_id}/data/{len(chunk)}",
        content=chunk,
        headers={"X-Upload-Offset": str(offset), "Content-Type": "application/octet-stream"},
    )


def send_all(client: httpx.Client, session_id: str, data: bytes, chunk_size: int = 512) -> None:
    for offset in range(0, len(data), chunk_size):
        response = send_chunk(client, session_id, offset, data[offset : offset + chunk_size])
        assert response.status_code == 200, response.text


def end(client: httpx.Client, session_id: str) -> httpx.Response:
    return client.post(f"{PREFIX}/{session_id}/")


def upload(
    client: httpx.Client, data: bytes, file_name: str = "ese.dll", **kwargs: Any
) -> httpx.Response:
    """Open, send in chunks, end; returns the end's response."""
    session_id = new_session(client, data, file_name, **kwargs)
    send_all(client, session_id, data)
    return end(client, session_id)
