"""Process-wide SQLite settings of `store.db`: storing records keeps its statement journals
in memory (a temp file per batch doubled the system calls of the write path)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apsw
import pytest

from datapath_helpers import KIB, make_image
from test_datapath_store import add_agent, push


class OpenedFiles(apsw.VFS):
    """The default VFS, noting the kind of every file SQLite opens through it."""

    def __init__(self) -> None:
        self.flags: list[int] = []
        super().__init__("opened-files", "", makedefault=True)

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        self.flags.append(flags[0])
        return super().xOpen(name, flags)


@pytest.fixture
def opened() -> Iterator[OpenedFiles]:
    vfs = OpenedFiles()
    try:
        yield vfs
    finally:
        vfs.unregister()


def test_storing_records_opens_no_statement_journal_file(tmp_path: Any, opened: OpenedFiles):
    from replicore.store import db, migrations

    path = tmp_path / "replicore.db"
    conn = db.connect(path, create=True)
    try:
        migrations.apply(conn, path)
        image = make_image(7, 256 * 4 * KIB + 100, 4 * KIB)
        push(conn, add_agent(conn), image, 1)
        assert any(f & apsw.SQLITE_OPEN_MAIN_DB for f in opened.flags), "the VFS saw nothing"
    finally:
        conn.close()
    subjournals = [f for f in opened.flags if f & apsw.SQLITE_OPEN_SUBJOURNAL]
    assert subjournals == []
