"""Exchange DLLs: the Exchange Server DLLs sources upload, kept with the version read from
each file's PE version resource (pefile).

Owns the `exchange_dlls` table (one row per source, file name and content: a source sees only
its own uploads) and the files under `state_dir/exchange/`, named by their SHA-256 so that two
sources uploading the same DLL share one copy. A file no row refers to is removed by
`remove_unreferenced()` (the upload sweep calls it), which also cleans up after a crash
between placing a file and recording it.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import apsw
import pefile

from ..errors import Unprocessable
from .db import row, rows

SCHEMA = """
CREATE TABLE exchange_dlls (
    id              INTEGER PRIMARY KEY,
    core_pk         INTEGER NOT NULL REFERENCES master_cores(id) ON DELETE CASCADE,
    file_name       TEXT NOT NULL,
    product_name    TEXT NOT NULL DEFAULT '',
    product_version TEXT NOT NULL,
    file_version    TEXT NOT NULL,
    size            INTEGER NOT NULL CHECK (size >= 0),
    sha256          TEXT NOT NULL,
    md5             TEXT NOT NULL,
    uploaded_at     REAL NOT NULL,
    UNIQUE (core_pk, file_name, sha256)
) STRICT;
CREATE INDEX exchange_dlls_sha256 ON exchange_dlls(sha256);
"""

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ ()+-]{0,199}$")


def check_file_name(name: str, field: str = "fileName") -> str:
    """A DLL's file name: a plain name (no path) ending in .dll."""
    if not _FILE_NAME.match(name) or ".." in name or not name.lower().endswith(".dll"):
        raise Unprocessable(
            "an Exchange DLL's file name is a plain name of letters, digits, '.', '_', '-',"
            " ' ', '(', ')', '+' (at most 200) ending in .dll",
            field=field,
        )
    return name


@dataclass(frozen=True)
class DllInfo:
    file_name: str
    product_name: str
    product_version: str | None
    file_version: str | None
    size: int
    sha256: str
    md5: str

    def api(self) -> dict[str, Any]:
        return {
            "fileName": self.file_name,
            "productName": self.product_name,
            "productVersion": self.product_version,
            "fileVersion": self.file_version,
            "size": self.size,
            "sha256": self.sha256,
            "md5": self.md5,
        }


def _dotted(ms: int, ls: int) -> str:
    return f"{ms >> 16}.{ms & 0xFFFF}.{ls >> 16}.{ls & 0xFFFF}"


def _strings(pe: pefile.PE) -> dict[str, str]:
    found: dict[str, str] = {}
    for info in getattr(pe, "FileInfo", None) or []:
        for entry in info:
            for table in getattr(entry, "StringTable", None) or []:
                for key, value in table.entries.items():
                    found[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return found


def inspect(data: bytes | Path, file_name: str) -> DllInfo:
    """Read a PE file's version resource (from bytes or a path); 422 if it is not a PE or
    is cut short (a section's data past the end of the file).

    The numeric VS_FIXEDFILEINFO versions are used (what Windows shows as the file and
    product version); the StringFileInfo strings only when there is no fixed info. A PE
    without a version resource has None versions."""
    blob = data.read_bytes() if isinstance(data, Path) else data
    try:
        pe = pefile.PE(data=blob, fast_load=True)
        pe.parse_data_directories(
            directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_RESOURCE"]]
        )
    except pefile.PEFormatError as error:
        raise Unprocessable(f"not a valid PE file: {error.value}", field="body") from None
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as error:
        raise Unprocessable(f"not a valid PE file: {error}", field="body") from None
    if len(pe.sections) != pe.FILE_HEADER.NumberOfSections:
        raise Unprocessable(
            "not a valid PE file: a section header or its data is missing (truncated?)",
            field="body",
        )
    for section in pe.sections:
        if section.PointerToRawData + section.SizeOfRawData > len(blob):
            name = section.Name.rstrip(b"\0").decode("ascii", "replace")
            raise Unprocessable(
                f"not a valid PE file: section {name} ends past the end of the file (truncated?)",
                field="body",
            )
    strings = _strings(pe)
    fixed = (getattr(pe, "VS_FIXEDFILEINFO", None) or [None])[0]
    if fixed is not None:
        file_version = _dotted(fixed.FileVersionMS, fixed.FileVersionLS)
        product_version = _dotted(fixed.ProductVersionMS, fixed.ProductVersionLS)
    else:
        file_version = strings.get("FileVersion")
        product_version = strings.get("ProductVersion")
    pe.close()
    return DllInfo(
        file_name=file_name,
        product_name=strings.get("ProductName", ""),
        product_version=product_version,
        file_version=file_version,
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        md5=hashlib.md5(blob, usedforsecurity=False).hexdigest(),
    )


def directory(state_dir: Path) -> Path:
    return state_dir / "exchange"


def place_file(state_dir: Path, source: Path, sha256: str) -> Path:
    """Move an uploaded file to its content address (durably); returns the new path."""
    target_dir = directory(state_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / sha256
    os.replace(source, target)
    fd = os.open(target_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return target


def add(conn: apsw.Connection, core_pk: int, info: DllInfo, now: float) -> dict[str, Any]:
    """Record a DLL of a source (a repeated upload of the same content refreshes its time);
    422 when it has no version resource (nothing to report for it)."""
    if info.product_version is None or info.file_version is None:
        raise Unprocessable(f"{info.file_name} has no version resource", field="fileName")
    fields = asdict(info)
    conn.execute(
        "INSERT INTO exchange_dlls(core_pk, file_name, product_name, product_version,"
        " file_version, size, sha256, md5, uploaded_at)"
        " VALUES (:core_pk, :file_name, :product_name, :product_version, :file_version,"
        " :size, :sha256, :md5, :now)"
        " ON CONFLICT (core_pk, file_name, sha256)"
        " DO UPDATE SET uploaded_at = excluded.uploaded_at",
        {**fields, "core_pk": core_pk, "now": now},
    )
    found = row(
        conn,
        "SELECT * FROM exchange_dlls WHERE core_pk = ? AND file_name = ? AND sha256 = ?",
        (core_pk, info.file_name, info.sha256),
    )
    assert found is not None
    return found


def for_core(conn: apsw.Connection, core_pk: int) -> list[dict[str, Any]]:
    return rows(
        conn,
        "SELECT * FROM exchange_dlls WHERE core_pk = ? ORDER BY file_name, uploaded_at DESC",
        (core_pk,),
    )


def latest(conn: apsw.Connection, core_pk: int, file_name: str) -> dict[str, Any] | None:
    """The source's most recently uploaded copy of `file_name` (names compare without case,
    as on Windows)."""
    return row(
        conn,
        "SELECT * FROM exchange_dlls WHERE core_pk = ? AND file_name = ? COLLATE NOCASE"
        " ORDER BY uploaded_at DESC, id DESC LIMIT 1",
        (core_pk, file_name),
    )


def has(conn: apsw.Connection, core_pk: int, file_name: str, sha256: str) -> bool:
    found = row(
        conn,
        "SELECT 1 AS x FROM exchange_dlls WHERE core_pk = ? AND file_name = ? COLLATE NOCASE"
        " AND sha256 = ?",
        (core_pk, file_name, sha256),
    )
    return found is not None


def api_row(found: dict[str, Any]) -> dict[str, Any]:
    """A stored DLL as the API shows it (ExchangeServerVersion-like; uploadedAt in epoch
    seconds, formatted by the API)."""
    return {
        "fileName": found["file_name"],
        "productName": found["product_name"],
        "productVersion": found["product_version"],
        "fileVersion": found["file_version"],
        "size": found["size"],
        "sha256": found["sha256"],
        "md5": found["md5"],
        "uploadedAt": found["uploaded_at"],
    }


def referenced(conn: apsw.Connection) -> set[str]:
    return {r["sha256"] for r in rows(conn, "SELECT DISTINCT sha256 FROM exchange_dlls")}


def remove_unreferenced(state_dir: Path, keep: set[str]) -> int:
    """Delete stored DLL files whose digest is not in `keep`; returns how many."""
    removed = 0
    target_dir = directory(state_dir)
    if not target_dir.is_dir():
        return 0
    for path in target_dir.iterdir():
        if path.is_file() and path.name not in keep:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
