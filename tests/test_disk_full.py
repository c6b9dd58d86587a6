"""A full database (the `server.max_database_bytes` cap, SQLite's max_page_count on the
daemon's writer, which fails exactly like a full disk: SQLITE_FULL) answers 507, leaves the
database sound and usable, and the push resumes once there is room again: the cap raised, or
space freed inside the file by deleting an agent and collecting garbage. The same on a real
full file system is `tests/long/disk_full_tmpfs.sh`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from faults_helpers import follow, integrity, query, verify
from pairing_helpers import pair_by_demand
from push_helpers import export, push, random_image, sha256

MIB = 1024 * 1024
ADMIN = ("admin", "correct horse battery")


def database_bytes(server: Any) -> int:
    (pages,), (size,) = query(server, "PRAGMA page_count")[0], query(server, "PRAGMA page_size")[0]
    return int(pages) * int(size)


def capped_server(make_server: Any, room: int, extra: str = "") -> Any:
    """A server whose database may grow `room` bytes past its empty size."""
    server = make_server(extra)
    empty = database_bytes(server)
    server.stop()
    set_cap(server, empty + room)
    server.start()
    assert server.cli("admin", "add", ADMIN[0], "--password-stdin", stdin=ADMIN[1]).status == 0
    return server


def set_cap(server: Any, cap: int) -> None:
    text = server.config_path.read_text()
    lines = [line for line in text.splitlines() if not line.startswith("max_database_bytes")]
    at = lines.index("[server]") + 1
    lines.insert(at, f"max_database_bytes = {cap}")
    server.config_path.write_text("\n".join(lines) + "\n")


def refused_for_space(run: Any) -> None:
    assert run.status != 0, run.stdout
    assert "507" in run.stderr or "full" in run.stderr.lower(), run.stderr


def test_a_push_past_the_cap_gets_507_and_resumes_once_the_cap_is_raised(
    make_server, make_source, tmp_path: Path
) -> None:
    server = capped_server(make_server, 6 * MIB)
    source = make_source("full")
    pair_by_demand(server, source, ["web01"], ADMIN)
    image = tmp_path / "disk.img"
    data = random_image(image, 12 * MIB, seed=1)  # incompressible: 12 MiB of records

    refused_for_space(push(source, server, "web01", {"vol": image}))
    # Sound and usable: consistent, readable, and what was acknowledged stayed.
    assert integrity(server) == [("ok",)]
    stored = query(server, "SELECT count(*) FROM records")[0][0]
    assert 0 < stored < 12 * MIB // (64 * 1024)
    assert query(server, "SELECT count(*) FROM sessions") == [(1,)]
    assert query(server, "SELECT count(*) FROM volume_images") == [(0,)]
    with server.client(source) as client:
        assert client.get("slave/agents").status_code == 200
        assert client.get("slave/repositories").status_code == 200
    assert verify(server)[0] == 0

    server.stop()
    set_cap(server, database_bytes(server) + 32 * MIB)
    server.start()
    follow(server, source)
    resumed = push(source, server, "web01", {"vol": image}).result
    assert resumed["records_sent"] == 12 * MIB // (64 * 1024) - stored
    assert sha256(export(server, "web01", "vol", tmp_path / "out.img")) == sha256(data)
    assert integrity(server) == [("ok",)]


def test_space_freed_inside_the_database_lets_the_push_complete_without_a_restart(
    make_server, make_source, tmp_path: Path
) -> None:
    # GC collects records older than the session timeout: keep it short.
    server = capped_server(make_server, 14 * MIB, "[replication]\nsession_timeout = 1.0\n")
    source = make_source("freed")
    pair_by_demand(server, source, ["old", "new"], ADMIN)
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    random_image(old, 8 * MIB, seed=2)
    data = random_image(new, 10 * MIB, seed=3)
    assert push(source, server, "old", {"vol": old}).status == 0

    refused_for_space(push(source, server, "new", {"vol": new}))
    assert integrity(server) == [("ok",)]

    with server.client(source) as client:
        assert client.delete("slave/agents/old").status_code == 200
    records = query(server, "SELECT count(*) FROM records")[0][0]
    time.sleep(1.2)  # garbage must be older than the session timeout
    purged = server.cli("bin", "purge", "--all")  # then collects garbage
    assert purged.status == 0, purged.stderr
    # The old agent's 128 records are gone (and those of the new agent's session, which
    # expired meanwhile: they are garbage too once older than the timeout).
    assert query(server, "SELECT count(*) FROM records")[0][0] <= records - 128

    assert push(source, server, "new", {"vol": new}).result["records_sent"] == 160
    assert sha256(export(server, "new", "vol", tmp_path / "out.img")) == sha256(data)
    assert integrity(server) == [("ok",)]
    assert verify(server)[0] == 0
