"""Test helpers for the fault tests (crash, disk full, verify): reading and damaging the
server's database from a second connection, and running `replicore verify` against it."""

from __future__ import annotations

import json
from typing import Any

import apsw


def query(server: Any, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on the server's database (the daemon may be running)."""
    conn = apsw.Connection(str(server.database_path), flags=apsw.SQLITE_OPEN_READONLY)
    conn.set_busy_timeout(15_000)
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def execute(server: Any, sql: str, args: tuple[Any, ...] = ()) -> int:
    """Run one write statement on the server's database through a second connection."""
    conn = apsw.Connection(str(server.database_path))
    conn.set_busy_timeout(15_000)
    try:
        conn.execute(sql, args)
        return conn.changes()
    finally:
        conn.close()


def integrity(server: Any) -> list[tuple[Any, ...]]:
    """`PRAGMA integrity_check` rows plus any `foreign_key_check` rows: [("ok",)] if sound."""
    return query(server, "PRAGMA integrity_check") + query(server, "PRAGMA foreign_key_check")


def image_id(server: Any, agent: str, volume: str, epoch: int) -> int:
    found = query(
        server,
        "SELECT v.id FROM volume_images v JOIN agents a ON a.id = v.agent_pk"
        " WHERE a.agent_id = ? AND v.driver_volume_id = ? AND v.epoch_number = ?",
        (agent, volume, epoch),
    )
    assert len(found) == 1, found
    return int(found[0][0])


def single_use_key(server: Any, image: int) -> tuple[int, bytes]:
    """(block index, key) of a block of the image whose key no other block there uses."""
    found = query(
        server,
        "SELECT min(block_index), key FROM image_blocks WHERE image_id = ? GROUP BY key"
        " HAVING count(*) = 1 ORDER BY 1 LIMIT 1",
        (image,),
    )
    assert found, "the image has no block with a key of its own"
    return int(found[0][0]), bytes(found[0][1])


def corrupt_record(server: Any, key: bytes) -> None:
    """Flip bytes in the middle of the stored record of `key` (same length), as bit rot would."""
    (data,) = query(server, "SELECT data FROM records WHERE key = ?", (key,))[0]
    middle = len(data) // 2
    damaged = data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 16])
    damaged += data[middle + 16 :]
    assert len(damaged) == len(data) and damaged != data
    assert execute(server, "UPDATE records SET data = ? WHERE key = ?", (damaged, key)) == 1


def verify(server: Any, *args: str) -> tuple[int, dict[str, Any]]:
    """`replicore verify --json ARGS` (in this process): (exit status, report)."""
    result = server.cli("verify", "--json", *args)
    assert result.status in (0, 1), result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["clean"] == (result.status == 0)
    return result.status, report


def follow(server: Any, *sources: Any) -> None:
    """After a restart (on a new port), point the sources' saved target at the new URL."""
    for source in sources:
        record = json.loads(source.target_path(server.core_id).read_text())
        source.save_target({**record, "url": server.url})
