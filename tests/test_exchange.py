"""Exchange DLLs: the version is read from the PE version resource (pefile) of a generated
DLL, uploaded DLLs are listed per source, dllinfo reads a DLL from the body or answers for
the stored copy, and what is not a PE is refused."""

from __future__ import annotations

import hashlib
from typing import Any

import pefile
import pytest

from pairing_helpers import db_snapshot, pair_by_demand
from pe_fixture import make_dll
from replicore.errors import Unprocessable
from replicore.store import exchange
from uploads_helpers import upload


@pytest.fixture
def paired(server: Any, make_source: Any, admin: Any) -> Any:
    source = make_source("alpha")
    pair_by_demand(server, source, ["mail01"], admin)
    return source


def test_generated_dll_is_a_pe_whose_version_pefile_reads():
    data = make_dll("15.2.1118.7", "15.2.1118.0")
    pe = pefile.PE(data=data)
    fixed = pe.VS_FIXEDFILEINFO[0]
    assert (fixed.FileVersionMS, fixed.FileVersionLS) == ((15 << 16) | 2, (1118 << 16) | 7)
    assert pe.FILE_HEADER.Characteristics & 0x2000  # IMAGE_FILE_DLL
    info = exchange.inspect(data, "ese.dll")
    assert info.file_version == "15.2.1118.7" and info.product_version == "15.2.1118.0"
    assert info.product_name == "Microsoft(R) Exchange"
    assert info.sha256 == hashlib.sha256(data).hexdigest() and info.size == len(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world",
        b"MZ" + b"\0" * 200,
        make_dll()[:300],
        make_dll()[:-100],
        bytes(range(256)) * 8,
    ],
    ids=["empty", "text", "dos-stub-only", "headers-only", "section-cut", "noise"],
)
def test_what_is_not_a_pe_is_refused(data):
    with pytest.raises(Unprocessable):
        exchange.inspect(data, "ese.dll")


def test_uploaded_dlls_are_listed_with_their_versions(server, paired):
    ese = make_dll("15.2.1118.7")
    older = make_dll("15.1.2507.6")
    with server.client(paired) as client:
        assert client.get("slave/exchange").json() == {"exchangeServerVersions": []}
        assert upload(client, ese, "ese.dll").status_code == 200
        assert upload(client, older, "ese.dll").status_code == 200
        assert upload(client, ese, "ese.dll").status_code == 200  # the same file again
        listed = client.get("slave/exchange")
    assert listed.status_code == 200
    versions = listed.json()["exchangeServerVersions"]
    assert [(v["fileName"], v["fileVersion"]) for v in versions] == [
        ("ese.dll", "15.2.1118.7"),
        ("ese.dll", "15.1.2507.6"),
    ]
    assert versions[0]["sha256"] == hashlib.sha256(ese).hexdigest()
    assert versions[0]["size"] == len(ese) and versions[0]["uploadedAt"].endswith("Z")


def test_dllinfo_reads_the_body_or_answers_for_the_stored_copy(server, paired):
    ese = make_dll("15.2.1118.7")
    with server.client(paired) as client:
        none_stored = client.post("slave/exchange/dllinfo/ese.dll")
        from_body = client.post("slave/exchange/dllinfo/ese.dll", content=ese)
        upload(client, ese, "ese.dll")
        stored = client.post("slave/exchange/dllinfo/ESE.DLL")
        body_again = client.post("slave/exchange/dllinfo/ese.dll", content=ese)
    assert none_stored.status_code == 404 and none_stored.json()["field"] == "fileName"
    assert from_body.status_code == 200, from_body.text
    info = from_body.json()
    assert info["fileName"] == "ese.dll" and info["fileVersion"] == "15.2.1118.7"
    assert info["productVersion"] == "15.2.1118.7" and info["size"] == len(ese)
    assert info["sha256"] == hashlib.sha256(ese).hexdigest() and info["isStored"] is False
    assert stored.status_code == 200 and stored.json()["isStored"] is True
    assert stored.json()["sha256"] == info["sha256"]
    assert body_again.json()["isStored"] is True


def test_dllinfo_refuses_what_is_not_a_pe_and_bad_names(server, paired):
    before = db_snapshot(server)
    with server.client(paired) as client:
        not_pe = client.post("slave/exchange/dllinfo/ese.dll", content=b"plain text, no PE")
        bad_name = client.post("slave/exchange/dllinfo/ese.txt", content=make_dll())
    assert not_pe.status_code == 422 and "not a valid PE" in not_pe.json()["message"]
    assert bad_name.status_code == 422 and bad_name.json()["field"] == "fileName"
    assert db_snapshot(server) == before


def test_a_dll_without_version_resource_is_read_but_not_kept(server, paired):
    bare = make_dll(with_version=False)
    with server.client(paired) as client:
        info = client.post("slave/exchange/dllinfo/bare.dll", content=bare)
        kept = upload(client, bare, "bare.dll")
        listed = client.get("slave/exchange")
    assert info.status_code == 200 and info.json()["fileVersion"] is None
    assert kept.status_code == 422 and "no version resource" in kept.json()["message"]
    assert listed.json()["exchangeServerVersions"] == []


def test_another_sources_dlls_are_not_shown(server, paired, make_source, admin):
    other = make_source("beta")
    pair_by_demand(server, other, ["mail01"], admin)
    with server.client(paired) as client:
        upload(client, make_dll(), "ese.dll")
    with server.client(other) as client:
        listed = client.get("slave/exchange")
        stored = client.post("slave/exchange/dllinfo/ese.dll")
    assert listed.json()["exchangeServerVersions"] == []
    assert stored.status_code == 404


def test_unpaired_callers_are_refused(server):
    with server.client() as client:
        assert client.get("slave/exchange").status_code == 401
        assert client.post("slave/exchange/dllinfo/ese.dll").status_code == 401
