"""Test helpers for the inventory area (agents, recovery points, recycle bin, retention, GC,
quotas): a store-level database with sources and agents, pushing images through the data
path's store functions (the same code the endpoints run), and, against a real server,
exports and direct looks at its database file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw

from datapath_helpers import key_entries, keys_checksum, split
from replicore import protocol
from replicore.store import db, migrations, repositories, sessions
from replicore.store.db import transaction

# --------------------------------------------------------------------------
# Store level (no server)
# --------------------------------------------------------------------------


def new_database(path: Path) -> apsw.Connection:
    conn = db.connect(path, create=True)
    migrations.apply(conn, path)
    return conn


def add_source(conn: apsw.Connection, core_id: str) -> int:
    with transaction(conn):
        conn.execute(
            "INSERT INTO master_cores(core_id, fingerprint, certificate, state, method,"
            " requested_at) VALUES (?, ?, '', 'approved', 'demand', 0)",
            (core_id, f"fp-{core_id}"),
        )
        return conn.last_insert_rowid()


def add_agent(
    conn: apsw.Connection, core_pk: int, agent_id: str, repository: str = "repo"
) -> dict[str, Any]:
    with transaction(conn):
        found = db.row(conn, "SELECT id FROM repositories WHERE name = ?", (repository,))
        repository_id = found["id"] if found else repositories.create(conn, repository)
        conn.execute(
            "INSERT INTO agents(core_pk, agent_id, state, repository_id, created_at)"
            " VALUES (?, ?, 'approved', ?, 0)",
            (core_pk, agent_id, repository_id),
        )
        agent = db.row(conn, "SELECT * FROM agents WHERE id = ?", (conn.last_insert_rowid(),))
    assert agent is not None
    return agent


def store_push(
    conn: apsw.Connection,
    agent: dict[str, Any],
    volume: str,
    epoch: int,
    image: bytes,
    block_size: int,
    *,
    previous: int | None = None,
    recovery_point: str | None = None,
    timestamp: str = "2026-11-27T10:00:00Z",
    only: list[int] | None = None,
    commit: bool = True,
    now: float | None = None,
) -> dict[str, Any]:
    """Push `image` as volume:epoch through the data path's store functions (open, keys,
    records, commit), each step in its own transaction as the endpoints do. With
    commit=False the session is left open; returns the session answer (+ `sessionPk`)."""
    moment = time.time() if now is None else now
    blocks = split(image, block_size)
    wanted = sessions.SessionRequest(
        job_id="job",
        driver_volume_id=volume,
        epoch_number=epoch,
        previous_epoch_number=previous,
        block_size=block_size,
        size=len(image),
        recovery_point_id=recovery_point or f"rp-{volume}-{epoch}",
        recovery_point_timestamp=timestamp,
        volume_count=1,
    )
    with transaction(conn):
        opened = sessions.open_session(conn, agent, wanted, moment)
        session = db.row(
            conn, "SELECT * FROM sessions WHERE session_id = ?", (opened["sessionId"],)
        )
    assert session is not None
    entries = key_entries(blocks, only)
    with transaction(conn):
        missing = sessions.record_keys(conn, session["id"], entries, moment)
    batch = []
    for index in missing:
        codec, payload = protocol.compress_block(blocks[index])
        batch.append(
            sessions.VerifiedRecord(
                index, protocol.record_key(blocks[index]), len(blocks[index]), codec, payload
            )
        )
    with transaction(conn):
        _, _, error = sessions.store_records(conn, session["id"], batch, moment)
    assert error is None, error
    answer = {**opened, "sessionPk": session["id"], "missing": missing}
    if commit:
        with transaction(conn):
            answer["commit"] = sessions.commit(
                conn, session["id"], len(blocks), keys_checksum(entries), moment
            )
    return answer


def read_back(conn: apsw.Connection, agent_pk: int, volume: str, epoch: int) -> bytes:
    from replicore.store import images

    image = images.find(conn, agent_pk, volume, epoch)
    assert image is not None, f"{volume}:{epoch} is gone"
    return b"".join(images.read_image(conn, image["id"]))


# --------------------------------------------------------------------------
# Server level
# --------------------------------------------------------------------------

ADMIN = ("admin", "correct horse battery")


def add_admin(server: Any) -> tuple[str, str]:
    """Create the administrator `ADMIN` on a server made with extra config; return it."""
    added = server.cli("admin", "add", ADMIN[0], "--password-stdin", stdin=ADMIN[1] + "\n")
    assert added.status == 0, added.stderr
    return ADMIN


@contextlib.contextmanager
def module_server(root: Path, extra_toml: str = "") -> Iterator[Any]:
    """A real server (as conftest's `make_server`) with an administrator `ADMIN`, for a
    module-scoped fixture whose tests only read (so they share one server's start-up)."""
    from conftest import RunningServer, write_config

    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "replicore.toml"
    write_config(config_path, root / "state", extra_toml)
    server = RunningServer(config_path, root / "state", root / "server.log").start()
    try:
        add_admin(server)
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def random_bytes(seed: int, size: int) -> bytes:
    """Incompressible bytes (so stored size == unique size), reproducible from `seed`."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.shake_256(f"{seed}:{counter}".encode()).digest(1 << 20)
        counter += 1
    return bytes(out[:size])


def query(server: Any, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = apsw.Connection(str(server.database_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def export(server: Any, tmp_path: Path, *args: str) -> bytes:
    """`replicore export ARGS -o FILE` on the server's database; the bytes written."""
    out = tmp_path / "export.img"
    result = server.cli("export", *args, "-o", str(out))
    assert result.status == 0, result.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def snapshot(server: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows (pairing_helpers.db_snapshot) but the audit log, which records
    every administrator login, refused requests included."""
    from pairing_helpers import db_snapshot

    found = db_snapshot(server)
    found.pop("audit_log", None)
    return found


def file_bytes(server: Any) -> int:
    """Main database file plus its WAL, in bytes."""
    total = 0
    for suffix in ("", "-wal"):
        path = f"{server.database_path}{suffix}"
        if os.path.exists(path):
            total += os.path.getsize(path)
    return total


def wait_for(condition: Any, timeout: float = 20.0, step: float = 0.1) -> Any:
    """Poll `condition()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
