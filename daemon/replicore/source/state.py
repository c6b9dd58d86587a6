"""What a source remembers between pushes, per target and agent, so that runs chain and resume.

One JSON file per (target, agent) in the identity directory:
`state/<target core id>/<agent id, %-quoted>.json`, written atomically (temp file + fsync +
rename) after every change that matters::

    {"version": 1, "agentId": "web01",
     "volumes": {"<driverVolumeId>": {"committedEpoch": 3}},
     "run": null | {"jobId", "recoveryPointId", "recoveryPointTimestamp", "volumeIds": [...],
                    "volumes": {"<driverVolumeId>": {"epoch", "previousEpoch", "size",
                                                      "blockSize", "sessionId", "committed"}}}}

`volumes` holds the last epoch the target committed for each volume (the parent of the next
one).  `run` is the push in progress: a run interrupted by a kill, a cut connection or a
restarted target is taken up again by the next push of the same volumes, with the same job,
recovery point and epochs, so the target hands back the same sessions.  A lock file next to the
state keeps two pushes of one agent to one target from running at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .identity import Identity

VERSION = 1


class StateError(RuntimeError):
    """The state cannot be read or locked."""


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def state_path(source: Identity, target_core_id: str, agent_id: str) -> Path:
    return source.directory / "state" / target_core_id / f"{quote(agent_id, safe='')}.json"


class AgentState:
    """The remembered epochs and the run in progress of one agent on one target."""

    def __init__(self, path: Path, agent_id: str, data: dict[str, Any]) -> None:
        self.path = path
        self.agent_id = agent_id
        self.data = data

    # -- files -------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def locked(cls, source: Identity, target_core_id: str, agent_id: str) -> Iterator[AgentState]:
        """Open (or create) the state, holding its lock until the block ends."""
        path = state_path(source, target_core_id, agent_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(
                    f"another push of agent {agent_id!r} to this target is running"
                ) from None
            yield cls(path, agent_id, cls._read(path, agent_id))

    @staticmethod
    def _read(path: Path, agent_id: str) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {"version": VERSION, "agentId": agent_id, "volumes": {}, "run": None}
        except ValueError as exc:
            raise StateError(
                f"{path} is not valid JSON ({exc}); move it away to start over"
            ) from None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise StateError(f"{path} is not a push state this version understands")
        data.setdefault("volumes", {})
        data.setdefault("run", None)
        return data

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as out:
            json.dump(self.data, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- epochs ------------------------------------------------------------------------

    def committed_epoch(self, volume_id: str) -> int | None:
        entry = self.data["volumes"].get(volume_id)
        return None if entry is None else entry.get("committedEpoch")

    @property
    def run(self) -> dict[str, Any] | None:
        return self.data["run"]

    def start_run(
        self, shapes: dict[str, tuple[int, int]]
    ) -> tuple[dict[str, Any], bool, list[dict[str, Any]]]:
        """The run to do for these volumes ({driverVolumeId: (size, blockSize)}): the
        interrupted one (under a new job id) if it was for the same volumes with the same
        shapes, else a new one.

        Returns (run, resumed, abandoned): `abandoned` lists the open sessions of an interrupted
        run that is not taken up ({"driverVolumeId", "jobId", "sessionId"}), to be discarded.
        """
        wanted = sorted(shapes)
        old = self.run
        if old is not None and sorted(old["volumeIds"]) == wanted:
            same = all(
                entry.get("committed") or (entry.get("size"), entry.get("blockSize")) == shapes[vid]
                for vid, entry in old["volumes"].items()
            )
            if same:
                # Each attempt is a job of its own on the target (an interrupted attempt's
                # mirrored job has ended); its open sessions move to the new job id.
                old["jobId"] = str(uuid.uuid4())
                self.save()
                return old, True, []
        abandoned: list[dict[str, Any]] = []
        if old is not None:
            for vid, entry in old["volumes"].items():
                if entry.get("sessionId") and not entry.get("committed"):
                    abandoned.append(
                        {
                            "driverVolumeId": vid,
                            "jobId": old["jobId"],
                            "sessionId": entry["sessionId"],
                        }
                    )
        run: dict[str, Any] = {
            "jobId": str(uuid.uuid4()),
            "recoveryPointId": str(uuid.uuid4()),
            "recoveryPointTimestamp": _utc_now(),
            "volumeIds": wanted,
            "volumes": {},
        }
        for vid in wanted:
            previous = self.committed_epoch(vid)
            size, block_size = shapes[vid]
            run["volumes"][vid] = {
                "epoch": 1 if previous is None else previous + 1,
                "previousEpoch": previous,
                "size": size,
                "blockSize": block_size,
                "sessionId": None,
                "committed": False,
            }
        self.data["run"] = run
        self.save()
        return run, False, abandoned

    def set_epoch(self, volume_id: str, epoch: int, previous: int | None) -> None:
        entry = self._run_entry(volume_id)
        entry.update(epoch=epoch, previousEpoch=previous, sessionId=None)
        self.save()

    def set_session(self, volume_id: str, session_id: str) -> None:
        entry = self._run_entry(volume_id)
        if entry.get("sessionId") != session_id:
            entry["sessionId"] = session_id
            self.save()

    def volume_committed(self, volume_id: str, epoch: int) -> None:
        self._run_entry(volume_id)["committed"] = True
        self.data["volumes"][volume_id] = {"committedEpoch": epoch}
        self.save()

    def finish_run(self) -> None:
        self.data["run"] = None
        self.save()

    def _run_entry(self, volume_id: str) -> dict[str, Any]:
        if self.run is None:
            raise StateError("no push in progress")
        return self.run["volumes"][volume_id]
