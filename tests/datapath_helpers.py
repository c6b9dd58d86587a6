"""Test helpers for the replication data path: small disk-like images, their key lists and
record batches built with the protocol encoders, and a minimal client that drives the
target's session endpoints over a pinned httpx client.

This is a test client, independent of the real push client (`source/push.py`): it sends
exactly what a test asks, including bodies a well-behaved client never would.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from replicore import protocol

KIB = 1024
MIB = 1024 * KIB


def make_image(seed: int, size: int, block_size: int) -> bytes:
    """`size` bytes cut in blocks of `block_size`: about 40% random, 30% zero, 30% copies of
    an earlier block (so deduplication within the image has work); the last block is short
    when `size` is not a multiple of the block size."""
    rng = random.Random(seed)
    blocks: list[bytes] = []
    count = -(-size // block_size)
    for _ in range(count):
        roll = rng.random()
        if roll < 0.3:
            blocks.append(bytes(block_size))
        elif roll < 0.6 and blocks:
            blocks.append(rng.choice(blocks))
        else:
            blocks.append(rng.randbytes(block_size))
    return b"".join(blocks)[:size]


def mutate(image: bytes, block_size: int, indices: Iterable[int], seed: int) -> bytes:
    """A copy of `image` with the blocks at `indices` rewritten with fresh random bytes."""
    rng = random.Random(seed)
    data = bytearray(image)
    for index in indices:
        start = index * block_size
        end = min(len(data), start + block_size)
        data[start:end] = rng.randbytes(end - start)
    return bytes(data)


def split(image: bytes, block_size: int) -> list[bytes]:
    return [image[i : i + block_size] for i in range(0, len(image), block_size)]


def key_entries(blocks: Sequence[bytes], indices: Iterable[int] | None = None) -> list[Any]:
    """Key entries (index, key, length) of `blocks` (all, or those at `indices`)."""
    chosen = range(len(blocks)) if indices is None else indices
    return [protocol.KeyEntry(i, protocol.record_key(blocks[i]), len(blocks[i])) for i in chosen]


def keys_checksum(entries: Iterable[Any]) -> str:
    checksum = protocol.KeyListChecksum()
    for entry in sorted(entries, key=lambda e: e.index):
        checksum.update(entry.index, entry.key)
    return checksum.hexdigest()


def frame(index: int, data: bytes, *, key: bytes | None = None, compress: bool = True) -> bytes:
    """One RRD1 frame for block `index` holding `data` (zstd when it helps), with its true
    key unless `key` is given."""
    codec, payload = protocol.compress_block(data) if compress else (protocol.CODEC_RAW, data)
    return protocol.encode_record(
        index, key if key is not None else protocol.record_key(data), len(data), codec, payload
    )


def records_body(frames: Sequence[bytes]) -> bytes:
    return protocol.encode_records_header(len(frames)) + b"".join(frames)


def record_batches(
    blocks: Sequence[bytes], indices: Iterable[int], max_bytes: int = 4 * MIB
) -> list[bytes]:
    """RRD1 bodies carrying the records of `indices`, each body under `max_bytes`."""
    bodies: list[bytes] = []
    current: list[bytes] = []
    size = 8
    for index in indices:
        encoded = frame(index, blocks[index])
        if current and (
            size + len(encoded) > max_bytes or len(current) == protocol.MAX_RECORDS_PER_BATCH
        ):
            bodies.append(records_body(current))
            current, size = [], 8
        current.append(encoded)
        size += len(encoded)
    if current:
        bodies.append(records_body(current))
    return bodies


@dataclass
class Pushed:
    """What `DataPathClient.push` did."""

    session_id: str
    missing: list[int] = field(default_factory=list)
    stored: int = 0
    already_present: int = 0
    commit: dict[str, Any] = field(default_factory=dict)


class DataPathClient:
    """Drives one agent's sessions on a target through `client` (pinned, with the source's
    certificate)."""

    def __init__(self, client: httpx.Client, agent_id: str, job_id: str = "job-1") -> None:
        self.client, self.agent_id, self.job_id = client, agent_id, job_id

    def session_body(
        self,
        volume: str,
        epoch: int,
        size: int,
        block_size: int,
        previous: int | None = None,
        recovery_point: str | None = None,
        timestamp: str = "2026-11-27T10:00:00Z",
        volume_count: int = 1,
        **overrides: Any,
    ) -> dict[str, Any]:
        body = {
            "agentId": self.agent_id,
            "jobId": self.job_id,
            "driverVolumeId": volume,
            "epochNumber": epoch,
            "previousEpochNumber": previous,
            "blockSize": block_size,
            "size": size,
            "recoveryPointId": recovery_point or f"rp-{volume}-{epoch}",
            "recoveryPointTimestamp": timestamp,
            "volumeCount": volume_count,
        }
        body.update(overrides)
        return body

    def open(self, *args: Any, **kwargs: Any) -> httpx.Response:
        return self.client.post("slave/sessions/new", json=self.session_body(*args, **kwargs))

    def open_ok(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        response = self.open(*args, **kwargs)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def path(self, session_id: str, agent_id: str | None = None) -> str:
        return f"slave/{agent_id or self.agent_id}/{self.job_id}/{session_id}"

    def keys(self, session_id: str, body: bytes, agent_id: str | None = None) -> httpx.Response:
        return self.client.post(
            f"{self.path(session_id, agent_id)}/records/keys",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )

    def missing(self, session_id: str, entries: Sequence[Any]) -> list[int]:
        """Announce `entries` (in batches of at most 65536); the indices answered missing."""
        found: list[int] = []
        for start in range(0, len(entries), protocol.MAX_KEYS_PER_BATCH):
            batch = entries[start : start + protocol.MAX_KEYS_PER_BATCH]
            response = self.keys(session_id, protocol.encode_keys(batch))
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/octet-stream"
            found.extend(protocol.decode_missing(response.content))
        return found

    def rawdata(self, session_id: str, body: bytes, agent_id: str | None = None) -> httpx.Response:
        return self.client.post(
            f"{self.path(session_id, agent_id)}/records/rawdata",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )

    def send_records(
        self, session_id: str, blocks: Sequence[bytes], indices: Iterable[int]
    ) -> tuple[int, int]:
        """Send the records of `indices`; (stored, already present) summed over batches."""
        stored = already = 0
        for body in record_batches(blocks, indices):
            response = self.rawdata(session_id, body)
            assert response.status_code == 200, response.text
            stored += response.json()["stored"]
            already += response.json()["alreadyPresent"]
        return stored, already

    def end(
        self,
        session_id: str,
        commit: bool = True,
        block_count: int = 0,
        checksum: str = "",
        background: bool = False,
        agent_id: str | None = None,
    ) -> httpx.Response:
        path = self.path(session_id, agent_id)
        if background:
            path = "slave/start/" + path.removeprefix("slave/")
        params = {"commit": "true" if commit else "false"}
        body = {"blockCount": block_count, "keysChecksum": checksum} if commit else None
        return self.client.request("DELETE", path, params=params, json=body)

    def poke(self, session_id: str) -> httpx.Response:
        return self.client.post(f"slave/poke/{self.agent_id}/{self.job_id}/{session_id}")

    def bitmap(self, session_id: str) -> httpx.Response:
        return self.client.get(f"slave/sessions/{session_id}/transferredblocks")

    def image_bitmap(self, volume: str, epoch: int) -> httpx.Response:
        return self.client.get(f"slave/{self.agent_id}/{volume}/{epoch}/transferredblocks")

    def push(
        self,
        volume: str,
        epoch: int,
        image: bytes,
        block_size: int,
        previous: int | None = None,
        only: Iterable[int] | None = None,
        **session: Any,
    ) -> Pushed:
        """Push `image` as `volume:epoch` and commit it (announcing only the blocks `only`
        when given, as a change-tracking source would)."""
        blocks = split(image, block_size)
        opened = self.open_ok(volume, epoch, len(image), block_size, previous, **session)
        result = Pushed(opened["sessionId"])
        entries = key_entries(blocks, only)
        result.missing = self.missing(result.session_id, entries)
        result.stored, result.already_present = self.send_records(
            result.session_id, blocks, result.missing
        )
        response = self.end(result.session_id, True, len(blocks), keys_checksum(entries))
        assert response.status_code == 200, response.text
        result.commit = response.json()
        return result


def bit(bitmap: bytes, index: int) -> bool:
    """Bit `index` of a transferred-blocks bitmap (LSB first in each byte)."""
    return bool(bitmap[index >> 3] >> (index & 7) & 1)
