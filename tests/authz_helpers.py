"""The authorization matrix (every seed operation x every kind of caller -> the expected
answer), its rendering as the table of docs/api/security.md, and the fixtures it runs on: a
module-scoped server with paired sources A and B (agents, committed images, open data-path,
direct and upload sessions, jobs), a pending and a denied source, and clients for each caller.

`python tests/authz_helpers.py` prints the Markdown table; `--write` puts it into
docs/api/security.md between its markers (test_authz_matrix checks they agree).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import ssl
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
import httpx

from conftest import ADMIN_PASSWORD, ADMIN_USER, RunningServer, write_config
from datapath_helpers import KIB, DataPathClient, make_image
from pairing_helpers import db_snapshot, pair_by_demand, request_pairing
from replicore.source import connection, identity

ROOT = Path(__file__).resolve().parent.parent
SECURITY_DOC = ROOT / "docs" / "api" / "security.md"
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"

#: The callers, in the table's column order.
CALLERS = ("none", "stranger", "pending", "denied", "own", "cross", "admin", "bad_password")
CALLER_TITLES = {
    "none": "no certificate",
    "stranger": "never-seen certificate",
    "pending": "pending source",
    "denied": "denied source",
    "own": "paired A, own resource",
    "cross": "paired A, B's resource",
    "admin": "admin credentials",
    "bad_password": "wrong admin password",
}
#: The answers a cell may expect.
SYMBOLS = {
    "ok": "let through: 2xx, or a 4xx about the body or state (any answer below 500 except "
    "401, 403 and 404)",
    "401": "401 Unauthorized (no or unknown certificate, or no or bad administrator "
    "credentials), also with an empty or garbage body",
    "403": "403 Forbidden (a known caller in the wrong role: the pairing is not approved; "
    "or the body names another source's core), also with an empty or garbage body",
    "404": "404 Not Found, the same answer as for a resource that does not exist",
    "hs": "refused in the TLS handshake: no HTTP answer at all (the handshake happens "
    "before any URL is seen, so this holds for every operation)",
    "-": "the operation names no resource of another source",
}
#: What the levels mean.
LEVELS = {
    "anonymous": "anyone over TLS",
    "known_source": "a client certificate on record (any pairing state)",
    "paired_source": "the client certificate of a source whose pairing is approved",
    "paired_source+admin": "a paired source's certificate and, in the same request, an "
    "administrator's HTTP Basic credentials (the original's 'by demand' operations); the "
    "route declares paired_source and checks the credentials first thing. Its own and "
    "B's-resource cells are sent with both; the certificate without credentials, or with a "
    "wrong password, gets 401",
    "admin": "an administrator's HTTP Basic credentials (a certificate is not needed)",
}

P404 = "401 hs 403 403 ok 404 401 401"  # paired source, names an agent/session/job
PAIRED = "401 hs 403 403 ok - 401 401"  # paired source, only its own data
#: (method, seed path without "replicationcomms/") -> (declared access level, cells).
MATRIX: dict[tuple[str, str], tuple[str, str]] = {
    ("GET", "consumedSeedDrives/{agentId}"): ("paired_source", P404),
    ("POST", "directreplication/slave/{agentId}/{jobId}/{sessionId}"): ("paired_source", P404),
    ("POST", "directreplication/slave/{agentId}/{jobId}/{sessionId}/bitmap"): (
        "paired_source",
        P404,
    ),
    ("POST", "directreplication/slave/{agentId}/{jobId}/{sessionId}/o3edata"): (
        "paired_source",
        P404,
    ),
    ("POST", "slave/{agentId}/{jobId}/{sessionId}/records/keys"): ("paired_source", P404),
    ("POST", "slave/{agentId}/{jobId}/{sessionId}/records/rawdata"): ("paired_source", P404),
    ("DELETE", "slave/{agentId}/{jobId}/{sessionId}?commit={commit}"): ("paired_source", P404),
    ("GET", "slave/{agentId}/{volumeDriverId}/{epochNumber}/transferredblocks"): (
        "paired_source",
        P404,
    ),
    ("GET", "slave/agents"): ("paired_source", PAIRED),
    ("DELETE", "slave/agents/{agentId}"): ("paired_source", P404),
    ("GET", "slave/agents/{agentId}"): ("paired_source", P404),
    ("GET", "slave/agents/{agentId}/{jobId}/{sessionId}/fileinfo"): ("paired_source", P404),
    ("GET", "slave/agents/{agentId}/{jobId}/{sessionId}/repoconnectiondescription"): (
        "paired_source",
        P404,
    ),
    ("DELETE", "slave/agents/{agentId}/metadataUpdate"): ("paired_source", P404),
    ("POST", "slave/agents/{agentId}/metadataUpdate"): ("paired_source", P404),
    ("GET", "slave/agents/{agentId}/metadataUpdate/status"): ("paired_source", P404),
    ("POST", "slave/agents/{agentId}/metadataUpdateJob"): ("paired_source", P404),
    ("GET", "slave/agents/{agentId}/orphanedReplicatedVolumeImages"): ("paired_source", P404),
    ("GET", "slave/agents/{agentId}/replicatedVolumeImagesNew"): ("paired_source", P404),
    ("GET", "slave/agents/{agentId}/replication/verifyStart"): ("paired_source", P404),
    ("GET", "slave/agents/{agentId}/rps"): ("paired_source", P404),
    ("GET", "slave/agents/{agentId}/rpsCount"): ("paired_source", P404),
    ("GET", "slave/agents/{agentId}/skipCount/{skipCount}/maxCount/{maxCount}/rps"): (
        "paired_source",
        P404,
    ),
    ("PUT", "slave/agents/{agentId}/status"): ("paired_source", P404),
    ("POST", "slave/agents/{agentId}/transferJob/{jobId}"): ("paired_source", P404),
    ("POST", "slave/agents/demand"): ("paired_source+admin", PAIRED),
    ("POST", "slave/agents/replicationJob/start"): ("paired_source", P404),
    ("POST", "slave/agents/replicationJob/sync"): ("paired_source", P404),
    ("POST", "slave/agents/request"): ("paired_source", PAIRED),
    ("GET", "slave/cores/agentRepositoryRelationships"): ("paired_source", PAIRED),
    ("PUT", "slave/cores/agentRepositoryRelationshipsByCoreInfo"): (
        "paired_source",
        "401 hs 403 403 ok 403 401 401",
    ),
    ("GET", "slave/cores/agentRepositoryRelationshipsByDemand"): ("paired_source+admin", PAIRED),
    ("PUT", "slave/cores/agentRepositoryRelationshipsByDemandByCoreInfo"): (
        "paired_source+admin",
        "401 hs 403 403 ok 403 401 401",
    ),
    ("GET", "slave/cores/masters"): ("admin", "401 hs 401 401 401 - ok 401"),
    ("GET", "slave/cores/noPairingSummaryInfo"): ("anonymous", "ok hs ok ok ok - ok ok"),
    ("POST", "slave/demand/agents/verify"): ("paired_source", PAIRED),
    ("POST", "slave/directreplicationsessions/new"): ("paired_source", P404),
    ("GET", "slave/exchange"): ("paired_source", PAIRED),
    ("POST", "slave/exchange/dllinfo/{fileName}"): ("paired_source", PAIRED),
    ("POST", "slave/newsession/"): ("paired_source", PAIRED),
    ("POST", "slave/pairing/demand"): ("admin", "401 hs 401 401 401 - ok 401"),
    ("POST", "slave/pairing/request"): ("anonymous", "ok hs ok ok ok - ok ok"),
    ("POST", "slave/pairing/sync"): ("known_source", "401 hs ok ok ok - 401 401"),
    ("DELETE", "slave/pairing?deleteRecoveryPoints={deleteRecoveryPoints}"): (
        "paired_source",
        PAIRED,
    ),
    ("POST", "slave/poke/{agentId}/{jobId}/{sessionId}"): ("paired_source", P404),
    ("GET", "slave/replicatedagents/rpsinfo"): ("paired_source", PAIRED),
    ("POST", "slave/replication/verifyStart/?useCredentials={useCredentials}"): (
        "anonymous",
        "ok hs ok ok ok - ok ok",
    ),
    ("GET", "slave/repositories"): ("paired_source", PAIRED),
    ("POST", "slave/request/agents/verify"): ("paired_source", PAIRED),
    ("GET", "slave/sessions/{sessionId}/transferredblocks"): ("paired_source", P404),
    ("POST", "slave/sessions/{uploadSessionId}/"): ("paired_source", P404),
    ("DELETE", "slave/sessions/{uploadSessionId}/"): ("paired_source", P404),
    ("POST", "slave/sessions/{uploadSessionId}/data/{dataSize}"): ("paired_source", P404),
    ("POST", "slave/sessions/new"): ("paired_source", P404),
    ("DELETE", "slave/start/{agentId}/{jobId}/{sessionId}?commit={commit}"): (
        "paired_source",
        P404,
    ),
    ("PUT", "slave/storage"): ("paired_source", PAIRED),
    # Sent with useCredentials=true: the credentials are checked, so only the admin passes.
    ("GET", "slave/validate/?useCredentials={useCredentials}"): (
        "anonymous",
        "401 hs 401 401 401 - ok 401",
    ),
}

#: What each access level implies for the callers (the cross column is per operation).
LEVEL_CELLS = {
    "anonymous": "ok hs ok ok ok",
    "known_source": "401 hs ok ok ok",
    "paired_source": "401 hs 403 403 ok",
    "paired_source+admin": "401 hs 403 403 ok",
    "admin": "401 hs 401 401 401",
}
LEVEL_ADMIN_CELLS = {
    "anonymous": "ok ok",
    "known_source": "401 401",
    "paired_source": "401 401",
    "paired_source+admin": "401 401",
    "admin": "ok 401",
}
#: Rows whose cells are not what their level alone implies, and why.
EXCEPTIONS = {
    ("GET", "slave/validate/?useCredentials={useCredentials}"): (
        "sent with useCredentials=true, which makes the anonymous operation check the "
        "administrator credentials"
    ),
}


def cells(key: tuple[str, str]) -> dict[str, str]:
    _, row = MATRIX[key]
    values = row.split()
    assert len(values) == len(CALLERS), key
    return dict(zip(CALLERS, values, strict=True))


def seed_key(method: str, seed_path: str) -> tuple[str, str]:
    return method, seed_path.removeprefix("replicationcomms/")


def render_markdown() -> str:
    """The matrix as a Markdown table with its legend."""
    lines = [
        "| operation | level | " + " | ".join(CALLER_TITLES[c] for c in CALLERS) + " |",
        "|---|---|" + "---|" * len(CALLERS),
    ]
    for key in sorted(MATRIX, key=lambda k: (k[1].lower(), k[0])):
        method, path = key
        level, _ = MATRIX[key]
        row = cells(key)
        lines.append(
            f"| `{method} {path}` | {level} | " + " | ".join(row[c] for c in CALLERS) + " |"
        )
    lines.append("")
    for level, text in LEVELS.items():
        lines.append(f"- {level}: {text}.")
    lines.append("")
    for symbol, text in SYMBOLS.items():
        lines.append(f"- `{symbol}`: {text}.")
    for key, why in EXCEPTIONS.items():
        lines.append(f"- `{key[0]} {key[1]}`: {why}.")
    return "\n".join(lines) + "\n"


def doc_table() -> str:
    text = SECURITY_DOC.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n") + "\n"


def write_doc() -> None:
    text = SECURITY_DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    SECURITY_DOC.write_text(f"{head}{BEGIN}\n{render_markdown()}{END}{tail}")


# --------------------------------------------------------------------------
# The world the matrix runs in
# --------------------------------------------------------------------------

BS = 16 * KIB
UNKNOWN_AGENT = "nobody-agent"
DIRECT_VOLUME = "direct-open"
UNKNOWN_JOB = "nobody-job"
#: Timeouts so long that no sweep changes the database while the matrix runs.
MATRIX_CONFIG = """
[pairing]
requests_per_hour = 1000
max_pending = 1000

[replication]
session_timeout = 86400.0

[jobs]
sync_timeout = 86400.0

[uploads]
max_open_sessions = 50
session_timeout = 86400.0

[recycle_bin]
sweep_interval = 86400.0

[console]
usage_sample_interval = 864000.0
"""


@contextlib.contextmanager
def module_server(
    root: Path, extra_toml: str = "", env: dict[str, str] | None = None
) -> Iterator[RunningServer]:
    """A started server in `root` for a whole test module (`env` added to its
    environment); killed at the end."""
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "replicore.toml"
    write_config(config_path, root / "state", extra_toml)
    server = RunningServer(config_path, root / "state", root / "server.log", extra_env=env or {})
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def add_admin(server: RunningServer) -> tuple[str, str]:
    result = server.cli("admin", "add", ADMIN_USER, "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    assert result.status == 0, result.stderr
    return ADMIN_USER, ADMIN_PASSWORD


def client(
    server: RunningServer,
    source: identity.Identity | None = None,
    local_address: str | None = None,
    timeout: float = 30.0,
) -> httpx.Client:
    """A client pinned to `server`, with `source`'s certificate, from `local_address`
    (another loopback address keeps a test's failed logins apart from the others')."""
    transport = httpx.HTTPTransport(
        verify=connection.ssl_context(server.pem, source), local_address=local_address
    )
    return httpx.Client(
        base_url=connection.base_url(server.url), transport=transport, timeout=timeout
    )


@dataclass
class Side:
    """One paired source and the resources it owns on the server."""

    source: identity.Identity
    agent: str
    job: str
    session: str  # an open data-path session of `agent` in `job`
    volume: str  # `volume`:`epoch` is a committed image of `agent`
    epoch: int
    direct_session: str  # an open direct session of `agent` in `job`
    upload_session: str
    core_id: str = ""

    def values(self) -> dict[str, str]:
        return {
            "agentId": self.agent,
            "jobId": self.job,
            "sessionId": self.session,
            "uploadSessionId": self.upload_session,
            "volumeDriverId": self.volume,
            "epochNumber": str(self.epoch),
            "skipCount": "0",
            "maxCount": "10",
            "fileName": "ese.dll",
            "dataSize": "4",
            "commit": "false",
            "deleteRecoveryPoints": "false",
            "useCredentials": "true",
            "directSessionId": self.direct_session,
            "coreId": self.core_id,
        }


@dataclass
class World:
    server: RunningServer
    admin: tuple[str, str]
    a: Side
    b: Side
    pending: identity.Identity
    denied: identity.Identity
    stranger: identity.Identity
    tmp: Path
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    #: The server's OpenAPI document (set by the test module).
    openapi: dict[str, Any] = field(default_factory=dict)

    def fresh_identity(self, name: str = "fresh") -> identity.Identity:
        return identity.init(self.tmp / f"{name}-{next(self.counter)}")

    def client(self, source: identity.Identity | None = None, **kwargs: Any) -> httpx.Client:
        return client(self.server, source, **kwargs)

    def open_session(self, side: Side, volume: str | None = None) -> str:
        return open_session(self.server, side, volume or f"fresh-{next(self.counter)}")

    def open_direct_session(self, side: Side) -> str:
        return open_direct_session(self.server, side, f"direct-{next(self.counter)}")

    def open_upload(self, side: Side) -> str:
        return open_upload(self.server, side)


def open_session(server: RunningServer, side: Side, volume: str) -> str:
    """A new open data-path session (`volume`:1) of `side`'s agent in its job."""
    with client(server, side.source) as c:
        body = DataPathClient(c, side.agent, side.job).session_body(volume, 1, 4 * BS, BS)
        response = c.post("slave/sessions/new", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["sessionId"])


def open_direct_session(server: RunningServer, side: Side, volume: str) -> str:
    with client(server, side.source) as c:
        body = DataPathClient(c, side.agent, side.job).session_body(volume, 1, 4 * BS, BS)
        response = c.post("slave/directreplicationsessions/new", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["sessionId"])


def open_upload(server: RunningServer, side: Side, size: int = 8) -> str:
    with client(server, side.source) as c:
        response = c.post(
            "slave/newsession/",
            json={"fileName": "ese.dll", "size": size, "md5": "0" * 32, "purpose": "exchange-dll"},
        )
    assert response.status_code == 201, response.text
    return str(response.json()["uploadSessionId"])


def job_body(values: dict[str, str]) -> dict[str, Any]:
    """The replicationJob/start body of a side's job (for its agent)."""
    return {
        "id": values["jobId"],
        "agents": [{"id": values["agentId"], "volumeImagesToTransfer": ["vol-1:2"]}],
    }


def _side(root: Path, server: RunningServer, admin: tuple[str, str], name: str) -> Side:
    source = identity.init(root / f"source-{name}")
    agent, job = f"{name}-web01", f"job-{name}"
    pair_by_demand(server, source, [agent, f"{name}-doomed"], admin)
    with client(server, source) as c:
        DataPathClient(c, agent, job).push("vol-1", 1, make_image(ord(name[0]), 4 * BS, BS), BS)
        started = c.post(
            "slave/agents/replicationJob/start", json=job_body({"jobId": job, "agentId": agent})
        )
        assert started.status_code in (200, 201), started.text
    side = Side(source, agent, job, "", "vol-1", 1, "", "", core_id=source.core_id)
    side.session = open_session(server, side, "vol-open")
    side.direct_session = open_direct_session(server, side, DIRECT_VOLUME)
    side.upload_session = open_upload(server, side)
    return side


def build_world(root: Path, server: RunningServer) -> World:
    """Sources A and B (each: agents NAME-web01 and NAME-doomed, a committed image vol-1:1,
    an open session, a direct session, an upload session, a running job), a pending and a
    denied source."""
    admin = add_admin(server)
    a = _side(root, server, admin, "a")
    b = _side(root, server, admin, "b")
    pending = identity.init(root / "source-pending")
    request_pairing(server, pending, ["p-web01"])
    denied = identity.init(root / "source-denied")
    refused = request_pairing(server, denied, ["d-web01"])
    assert server.cli("pairing", "deny", str(refused["requestId"])).status == 0
    stranger = identity.init(root / "source-stranger")  # never shown to the server
    return World(server, admin, a, b, pending, denied, stranger, root)


def snapshot(
    server: RunningServer, ignore: dict[str, set[str]] | None = None
) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (pairing_helpers.db_snapshot) but the audit log (failed
    logins are written there on purpose), without the columns in `ignore` per table."""
    if not ignore:
        found = db_snapshot(server)
        found.pop("audit_log", None)
        return found
    conn = apsw.Connection(str(server.database_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' AND name != 'audit_log' ORDER BY name"
            )
        ]
        result = {}
        for table in tables:
            columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
            kept = [c for c in columns if c not in ignore.get(table, set())]
            names = ", ".join(f'"{c}"' for c in kept)
            rows = conn.execute(f'SELECT {names} FROM "{table}"')
            result[table] = sorted(map(tuple, rows), key=repr)
        return result
    finally:
        conn.close()


def unknown_values(side: Side) -> dict[str, str]:
    """`side.values()` with every resource replaced by one that does not exist."""
    return {
        **side.values(),
        "agentId": UNKNOWN_AGENT,
        "jobId": UNKNOWN_JOB,
        "sessionId": str(uuid.uuid4()),
        "uploadSessionId": str(uuid.uuid4()),
        "directSessionId": str(uuid.uuid4()),
        "coreId": "nobody-core",
    }


#: The values of `Side.values()` that name a resource of that side.
RESOURCE_VALUES = ("agentId", "jobId", "sessionId", "uploadSessionId", "directSessionId", "coreId")


def normalise(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        if old:
            text = text.replace(old, new)
    return re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<uuid>", text)


def handshake_refused(
    server: RunningServer, stranger: identity.Identity, method: str, path: str
) -> str | None:
    """None when a never-seen client certificate gets no HTTP answer; else what it got."""
    try:
        with client(server, stranger, timeout=10.0) as c:
            response = c.request(method, path)
    except (httpx.TransportError, ssl.SSLError):
        return None
    return f"HTTP {response.status_code}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_doc()
    else:
        print(render_markdown(), end="")
