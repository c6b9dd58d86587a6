"""The target's mirror of a push's replication job: started with the run, synced with its
progress while it runs, ended with its outcome, so the operator sees the source's job
(`replicore jobs list`, the console) as it happens.

The mirror is informational: a refusal or a lost answer never fails the push itself.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any
from urllib.parse import quote

from .progress import Counters
from .transport import TargetClient, TransportError

#: Seconds between progress syncs (well inside the target's default 600 s sync timeout).
SYNC_INTERVAL = 10.0


class JobMirror:
    def __init__(
        self,
        client: TargetClient,
        job_id: str,
        agent_id: str,
        volume_images: list[str],
        counters: Counters,
        streams: int,
    ) -> None:
        self.client, self.job_id, self.agent_id = client, job_id, agent_id
        self.volume_images, self.counters, self.streams = volume_images, counters, streams
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def _post(self, path: str, body: dict[str, Any] | None) -> None:
        with contextlib.suppress(TransportError):
            self.client.request("POST", path, json_body=body, retry=False)

    def start(self) -> None:
        """Start (or, for a resumed run, re-sync) the job and its transfer child, then sync
        its progress every SYNC_INTERVAL seconds until `finish`; on a thread of its own, so
        that the push does not wait for the mirror."""
        self._ticker = threading.Thread(target=self._run, name="job-sync", daemon=True)
        self._ticker.start()

    def _run(self) -> None:
        agent = quote(self.agent_id, safe="")
        self._post(
            "slave/agents/replicationJob/start",
            {
                "id": self.job_id,
                "agents": [{"id": self.agent_id, "volumeImagesToTransfer": self.volume_images}],
                "numberParallelPipelines": self.streams,
            },
        )
        self._post(f"slave/agents/{agent}/transferJob/{quote(self.job_id, safe='')}", None)
        while not self._stop.wait(SYNC_INTERVAL):
            self.sync("running")

    def sync(self, state: str, error: str = "") -> None:
        counters = self.counters
        done = state == "succeeded"
        progress = 100.0 if done else 100.0 * counters.bytes_read / max(1, counters.total_bytes)
        transfer = {"agentId": self.agent_id, "state": state, "progress": round(progress, 1)}
        transfer["bytesTransferred"] = counters.bytes_sent
        body: dict[str, Any] = {
            "id": self.job_id,
            "state": state,
            "phase": "transfer",
            "progress": round(progress, 1),
            "bytesTransferred": counters.bytes_sent,
            "bytesTotal": counters.total_bytes,
            "transfers": [transfer],
        }
        if error:
            body["errorDetails"] = error[:4096]
        self._post("slave/agents/replicationJob/sync", body)

    def finish(self, error: BaseException | None) -> None:
        """End the job: succeeded, or failed with the error's message."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.sync("failed" if error else "succeeded", str(error or ""))
