"""The local control channel: a unix socket in the state directory (`control.sock`, mode 0600)
on which the running daemon answers facts only it knows, for `replicore status`.

Protocol: the client connects, sends one JSON object and a newline (`{"command": "status"}`),
and reads one JSON object back; the daemon then closes the connection. Commands:
- `status`: version, pid, start time and uptime, API and metrics listen URLs, the server
  certificate's fingerprint, requests and record uploads in progress, and the database's
  live counts (open sessions, running jobs) as the daemon sees them.
- `reload`: the same as SIGHUP (re-read the config, reload the TLS certificate); answers what
  was applied or why it was refused.
Answers carry `"ok": true`, or `"ok": false` with an `"error"`.

The socket doubles as a lock: a daemon that finds the socket of a live daemon in its state
directory refuses to start (two daemons on one database would be a disaster); a socket left
by a crashed daemon is removed. Only the service user (and root) can connect: the mode is
0600 and the state directory 0700.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger("replicore.control")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 5.0
#: sockaddr_un holds 108 bytes; longer paths are reached through /proc/self/fd.
_MAX_SUN_PATH = 100

Command = Callable[[], Awaitable[dict[str, Any]]]


class AlreadyRunning(RuntimeError):
    """Another daemon answers on the control socket of this state directory."""


class Unreachable(RuntimeError):
    """No daemon answers on the control socket (not running, or no permission)."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """A sockaddr_un path for `path`, short enough however deep the state directory is."""
    text = str(path)
    if len(os.fsencode(text)) <= _MAX_SUN_PATH:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def query(path: Path, command: str = "status", timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """Ask the daemon listening on `path`; raises Unreachable when none answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _address(path) as address:
                sock.connect(address)
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (FileNotFoundError, ConnectionRefusedError):
            raise Unreachable(f"no daemon answers on {path} (not running)") from None
        except PermissionError:
            raise Unreachable(
                f"no permission to connect to {path}: run as the service's user or root"
            ) from None
        except OSError as error:
            raise Unreachable(f"cannot talk to the daemon on {path}: {error}") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise Unreachable(f"the daemon on {path} answered something that is not JSON") from None
    if not isinstance(answer, dict):
        raise Unreachable(f"the daemon on {path} answered something that is not an object")
    return answer


def ensure_not_running(path: Path) -> None:
    """Raise AlreadyRunning when a daemon answers on path; remove a dead daemon's socket."""
    if not (path.exists() or path.is_symlink()):
        return
    try:
        query(path, "status", timeout=2.0)
    except Unreachable:
        path.unlink(missing_ok=True)
    else:
        raise AlreadyRunning(
            f"another replicore daemon is running on this state directory ({path})"
        )


def _claim(path: Path) -> socket.socket:
    """Bind and listen on path (mode 0600), removing a stale socket of a dead daemon."""
    ensure_not_running(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # the socket is created 0600, never wider for an instant
    try:
        with _address(path) as address:
            sock.bind(address)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


async def serve(
    path: Path,
    commands: dict[str, Command],
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer commands on the unix socket at `path` until cancelled; removes it on exit."""
    sock = _claim(path)
    inode = os.stat(path).st_ino
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        task_status.started(path)
        await trio.serve_listeners(partial(_handle, commands), [listener])
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:  # ours, not a successor's
                path.unlink()
        await trio.aclose_forcefully(listener)


async def _handle(commands: dict[str, Command], stream: trio.SocketStream) -> None:
    async with stream:
        answer: dict[str, Any]
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await _read_request(stream)
            name = request.get("command") if isinstance(request, dict) else None
            if name not in commands:
                answer = {
                    "ok": False,
                    "error": f"unknown command {name!r}",
                    "commands": sorted(commands),
                }
            else:
                answer = {"ok": True, **await commands[name]()}
        except (ValueError, trio.TooSlowError) as error:
            answer = {"ok": False, "error": f"bad request: {error}"}
        except Exception as error:
            log.exception("control command failed")
            answer = {"ok": False, "error": f"internal error: {type(error).__name__}"}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(json.dumps(answer, default=str).encode() + b"\n")


async def _read_request(stream: trio.SocketStream) -> Any:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
    return json.loads(data.split(b"\n", 1)[0] or b"null")
