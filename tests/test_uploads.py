"""File upload sessions over a real server: chunks must come at the offset received so far
and with the size announced, the end checks size and MD5 (a mismatch keeps nothing), a cancel
frees the space, abandoned sessions expire, sizes and open sessions are bounded, and one
source never reaches another's sessions."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pairing_helpers import db_snapshot, pair_by_demand
from pe_fixture import make_dll
from uploads_helpers import end, new_session, send_all, send_chunk, upload

ADMIN = ("admin", "correct horse battery")
DLL = make_dll("15.2.1118.7")


def session_body(**overrides: Any) -> dict[str, Any]:
    return {
        "fileName": "ese.dll",
        "size": 10,
        "md5": "0" * 32,
        "purpose": "exchange-dll",
        **overrides,
    }


def files_under(server: Any, name: str) -> list[Path]:
    folder = server.state_dir / name
    return sorted(folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def paired(server: Any, make_source: Any, admin: Any) -> Any:
    source = make_source("alpha")
    pair_by_demand(server, source, ["mail01"], admin)
    return source


def paired_server(make_server: Any, make_source: Any, toml: str) -> tuple[Any, Any]:
    server = make_server(toml)
    result = server.cli("admin", "add", ADMIN[0], "--password-stdin", stdin=ADMIN[1] + "\n")
    assert result.status == 0, result.stderr
    source = make_source("alpha")
    pair_by_demand(server, source, ["mail01"], ADMIN)
    return server, source


def test_upload_in_chunks_is_checked_and_kept(server, paired):
    with server.client(paired) as client:
        session_id = new_session(client, DLL)
        send_all(client, session_id, DLL, chunk_size=500)
        ended = end(client, session_id)
        retried = end(client, session_id)
    assert ended.status_code == 200, ended.text
    answer = ended.json()
    assert answer["state"] == "completed" and answer["received"] == len(DLL)
    assert answer["md5"] == hashlib.md5(DLL).hexdigest()
    assert answer["exchangeDll"]["fileVersion"] == "15.2.1118.7"
    assert retried.status_code == 200 and retried.json() == answer
    assert files_under(server, "uploads") == []
    kept = files_under(server, "exchange")
    assert [p.name for p in kept] == [hashlib.sha256(DLL).hexdigest()]
    assert kept[0].read_bytes() == DLL


def test_wrong_md5_is_rejected_and_nothing_is_kept(server, paired):
    with server.client(paired) as client:
        session_id = new_session(client, DLL, md5="0" * 32)
        send_all(client, session_id, DLL)
        ended = end(client, session_id)
        later = send_chunk(client, session_id, len(DLL), b"x")
        listed = client.get("slave/exchange")
    assert ended.status_code == 422 and ended.json()["field"] == "md5"
    assert ended.json()["actualMd5"] == hashlib.md5(DLL).hexdigest()
    assert files_under(server, "uploads") == [] and files_under(server, "exchange") == []
    assert listed.json()["exchangeServerVersions"] == []
    assert later.status_code == 409 and later.json()["state"] == "failed"


def test_replayed_chunk_is_refused_and_not_appended_twice(server, paired):
    data = DLL
    with server.client(paired) as client:
        session_id = new_session(client, data)
        first = send_chunk(client, session_id, 0, data[:600])
        replay = send_chunk(client, session_id, 0, data[:600])
        ahead = send_chunk(client, session_id, 1200, data[1200:])
        rest = send_chunk(client, session_id, 600, data[600:])
        ended = end(client, session_id)
    assert first.status_code == 200 and first.json()["received"] == 600
    assert replay.status_code == 409 and replay.json()["expectedOffset"] == 600
    assert replay.json()["field"] == "X-Upload-Offset"
    assert ahead.status_code == 409
    assert rest.status_code == 200 and rest.json()["received"] == len(data)
    assert ended.status_code == 200, ended.text


def test_chunk_length_must_equal_data_size(server, paired):
    with server.client(paired) as client:
        session_id = new_session(client, DLL)
        before = db_snapshot(server)

        def chunk(size: object, content: bytes, offset: str | bytes | None = "0") -> Any:
            headers = {} if offset is None else {"X-Upload-Offset": offset}
            return client.post(
                f"slave/sessions/{session_id}/data/{size}", content=content, headers=headers
            )

        short = chunk(100, DLL[:99])
        words = chunk("lots", DLL[:99])
        past_end = chunk(len(DLL) + 1, DLL + b"!")
        superscript = chunk("\u00b2", DLL[:2])  # a digit to str.isdigit() but not to int()
        latin_offset = chunk(99, DLL[:99], offset="\u00b2".encode("latin-1"))
        no_offset = chunk(99, DLL[:99], offset=None)
        incomplete = end(client, session_id)
    assert short.status_code == 422 and short.json()["field"] == "dataSize"
    assert words.status_code == 422 and words.json()["field"] == "dataSize"
    assert past_end.status_code == 422 and past_end.json()["field"] == "dataSize"
    assert superscript.status_code == 422 and superscript.json()["field"] == "dataSize"
    assert latin_offset.status_code == 400 and "X-Upload-Offset" in latin_offset.json()["message"]
    assert no_offset.status_code == 400 and "X-Upload-Offset" in no_offset.json()["message"]
    assert incomplete.status_code == 422 and incomplete.json()["received"] == 0
    assert db_snapshot(server) == before
    assert files_under(server, "uploads") == []


def test_cancel_frees_the_space(server, paired):
    with server.client(paired) as client:
        session_id = new_session(client, DLL)
        send_chunk(client, session_id, 0, DLL[:700])
        partial = [p.stat().st_size for p in files_under(server, "uploads")]
        cancelled = client.delete(f"slave/sessions/{session_id}/")
        again = client.delete(f"slave/sessions/{session_id}/")
        late = send_chunk(client, session_id, 700, DLL[700:])
    assert partial == [700]
    assert cancelled.status_code == 204 and cancelled.content == b""
    assert again.status_code == 204
    assert files_under(server, "uploads") == []
    assert late.status_code == 409 and late.json()["state"] == "cancelled"


def test_completed_upload_cannot_be_cancelled(server, paired):
    with server.client(paired) as client:
        session_id = new_session(client, DLL)
        send_all(client, session_id, DLL)
        assert end(client, session_id).status_code == 200
        response = client.delete(f"slave/sessions/{session_id}")
    assert response.status_code == 409 and response.json()["state"] == "completed"


def test_a_file_that_does_not_suit_its_purpose_is_not_kept(server, paired):
    not_a_dll = b"This is not a PE file at all. " * 40
    with server.client(paired) as client:
        ended = upload(client, not_a_dll)
        listed = client.get("slave/exchange")
    assert ended.status_code == 422 and "PE" in ended.json()["message"]
    assert files_under(server, "uploads") == [] and files_under(server, "exchange") == []
    assert listed.json()["exchangeServerVersions"] == []


def test_sizes_and_open_sessions_are_bounded(make_server, make_source):
    server, source = paired_server(
        make_server, make_source, "[uploads]\nmax_file_bytes = 4096\nmax_open_sessions = 2\n"
    )
    with server.client(source) as client:
        too_big = client.post(
            "slave/newsession/",
            json={"fileName": "ese.dll", "size": 4097, "md5": "0" * 32, "purpose": "exchange-dll"},
        )
        first = new_session(client, DLL)
        new_session(client, DLL)
        third = client.post(
            "slave/newsession/",
            json={"fileName": "ese.dll", "size": 10, "md5": "0" * 32, "purpose": "exchange-dll"},
        )
        client.delete(f"slave/sessions/{first}/")
        after_cancel = new_session(client, DLL)
    assert too_big.status_code == 413 and too_big.json()["field"] == "size"
    assert third.status_code == 429
    assert uuid.UUID(after_cancel)


def test_abandoned_session_expires_and_its_file_goes(make_server, make_source):
    server, source = paired_server(make_server, make_source, "[uploads]\nsession_timeout = 0.5\n")
    with server.client(source) as client:
        session_id = new_session(client, DLL)
        assert send_chunk(client, session_id, 0, DLL[:100]).status_code == 200
        deadline = time.monotonic() + 30
        while files_under(server, "uploads"):
            assert time.monotonic() < deadline, "the sweep never removed the abandoned upload"
            time.sleep(0.1)
        late = send_chunk(client, session_id, 100, DLL[100:])
    assert late.status_code in (404, 409)  # expired, or already forgotten
    if late.status_code == 409:
        assert late.json()["state"] == "expired"
    assert server.stop() == 0


def test_another_sources_sessions_are_not_found(server, paired, make_source, admin):
    other = make_source("beta")
    pair_by_demand(server, other, ["mail01"], admin)
    with server.client(paired) as client:
        session_id = new_session(client, DLL)
        send_chunk(client, session_id, 0, DLL[:100])
    before = db_snapshot(server)
    with server.client(other) as client:
        answers = [
            send_chunk(client, session_id, 100, DLL[100:200]),
            end(client, session_id),
            client.delete(f"slave/sessions/{session_id}/"),
            send_chunk(client, str(uuid.uuid4()), 0, b"x"),
        ]
        not_uuid = client.post("slave/sessions/not-a-uuid/")
    assert [a.status_code for a in answers] == [404] * 4
    assert answers[0].json()["message"] == answers[3].json()["message"]
    assert not_uuid.status_code == 404
    assert db_snapshot(server) == before
    assert [p.stat().st_size for p in files_under(server, "uploads")] == [100]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{oops", 400, None),
        (session_body(size="big"), 422, "size"),
        (session_body(size=-1), 422, "size"),
        (session_body(size=2**63), 422, "size"),  # over SQLite's INTEGER
        (session_body(md5="xyz"), 422, "md5"),
        (session_body(purpose="music"), 422, "purpose"),
        (session_body(fileName="../ese.dll"), 422, "fileName"),
        (session_body(fileName="ese.exe"), 422, "fileName"),
        ({"size": 10, "md5": "0" * 32, "purpose": "exchange-dll"}, 422, "fileName"),
    ],
)
def test_bad_new_session_is_refused_and_changes_nothing(server, paired, body, status, field):
    before = db_snapshot(server)
    with server.client(paired) as client:
        if isinstance(body, bytes):
            response = client.post("slave/newsession/", content=body)
        else:
            response = client.post("slave/newsession/", json=body)
    assert response.status_code == status, response.text
    assert response.json().get("field") == field
    assert db_snapshot(server) == before


def test_unpaired_callers_cannot_upload(server):
    with server.client() as client:
        response = client.post(
            "slave/newsession/",
            json={"fileName": "ese.dll", "size": 1, "md5": "0" * 32, "purpose": "exchange-dll"},
        )
    assert response.status_code == 401
