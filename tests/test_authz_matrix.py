"""Who may do what: every operation of the seed list against every kind of caller, as the
matrix in authz_helpers (and docs/api/security.md) says; authorization before the body is
read; another source's resources indistinguishable from missing ones; nothing changed by a
refused request. Also the audit log of operator actions and administrator logins, and the
per-address limit on failed administrator logins.

One server for the module (authz_helpers.build_world); the matrix runs as one test per
operation. Cells expecting 401/403 are sent with a garbage body: the answer must still be
the authorization one. Failed logins are sent from their own loopback addresses
(127.0.x.y), so that no test reaches another's rate limit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import authz_helpers as az
from pairing_helpers import pair_by_demand, pairing_body, request_pairing
from replicore import auth, protocol
from test_routes import seed_operations

GARBAGE = b'\x00{"not json'
WRONG_PASSWORD = "not the password at all"
#: Loopback addresses, one per failed-login sender.
_addresses = iter(f"127.0.{i // 250 + 1}.{i % 250 + 2}" for i in range(10_000))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("authz")
    with az.module_server(root / "server", az.MATRIX_CONFIG) as server:
        yield az.build_world(root, server)


# --------------------------------------------------------------------------
# The requests: what caller A sends for each operation, naming the resources in `v`
# (A's own, B's, or ones that do not exist). `own` may use fresh resources, so that an
# operation that ends or deletes something leaves the shared ones in place.
# --------------------------------------------------------------------------


@dataclass
class Req:
    values: dict[str, str] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: The source sending the "own" request, when not A (unpairing uses a source of its own).
    source: Any = None
    after: Callable[[httpx.Response], None] | None = None


Builder = Callable[[az.World, dict[str, str], bool], Req]

META = {"displayName": "web01", "hostName": "web01.example", "volumes": [{"id": "c", "size": 1}]}


def _session_body(w: az.World, v: dict[str, str], volume: str = "") -> dict[str, Any]:
    return {
        "agentId": v["agentId"],
        "jobId": v["jobId"],
        "driverVolumeId": volume or f"fresh-{next(w.counter)}",
        "epochNumber": 1,
        "previousEpochNumber": None,
        "blockSize": az.BS,
        "size": 4 * az.BS,
        "recoveryPointId": f"rp-{next(w.counter)}",
        "recoveryPointTimestamp": "2026-11-27T10:00:00Z",
        "volumeCount": 1,
    }


def _fresh_agents(w: az.World) -> dict[str, Any]:
    return {"agents": [{"agentInfo": {"id": f"new-{next(w.counter)}", "displayName": "n"}}]}


def _direct(v: dict[str, str]) -> dict[str, str]:
    return {"sessionId": v["directSessionId"]}


def _fresh_session(w: az.World, v: dict[str, str], own: bool) -> dict[str, str]:
    return {"sessionId": w.open_session(w.a)} if own else {}


def _fresh_direct(w: az.World, v: dict[str, str], own: bool) -> dict[str, str]:
    return {"sessionId": w.open_direct_session(w.a)} if own else _direct(v)


def _fresh_upload(w: az.World, v: dict[str, str], own: bool) -> dict[str, str]:
    return {"uploadSessionId": w.open_upload(w.a)} if own else {}


def _wait_for_background_end(w: az.World, path: str) -> Callable[[httpx.Response], None]:
    """After `DELETE slave/start/...`: poke until the background end is over, so that it
    cannot change the database while the next operation's refused cells are checked."""

    def wait(_: httpx.Response) -> None:
        with w.client(w.a.source) as c:
            for _ in range(200):
                poked = c.post("slave/poke/" + path.removeprefix("slave/start/").split("?")[0])
                if poked.status_code != 200 or poked.json() is True:
                    return
                time.sleep(0.05)

    return wait


def _unpair_own(w: az.World, v: dict[str, str], own: bool) -> Req:
    if not own:
        return Req()
    source = w.fresh_identity("unpair")
    pair_by_demand(w.server, source, ["c-web01"], w.admin)
    return Req(source=source)


def _with_metadata_update(w: az.World, v: dict[str, str], own: bool) -> Req:
    if own:
        with w.client(w.a.source) as c:
            started = c.post(f"slave/agents/{v['agentId']}/metadataUpdate", json=META)
        assert started.status_code == 202, started.text
    return Req()


def _start_end(w: az.World, v: dict[str, str], own: bool) -> Req:
    values = _fresh_session(w, v, own)
    req = Req(values=values)
    if own:
        sid = values["sessionId"]
        req.after = _wait_for_background_end(w, f"slave/start/{v['agentId']}/{v['jobId']}/{sid}")
    return req


REQUESTS: dict[tuple[str, str], Builder] = {
    ("POST", "directreplication/slave/{agentId}/{jobId}/{sessionId}"): lambda w, v, own: Req(
        values=_direct(v),
        json={
            "fullPath": "/snapshots/c.img",
            "openInfo": {
                "blockSize": az.BS,
                "scid": "s-1",
                "size": 4 * az.BS,
                "volumeId": az.DIRECT_VOLUME,
            },
        },
    ),
    ("POST", "directreplication/slave/{agentId}/{jobId}/{sessionId}/bitmap"): lambda w, v, own: Req(
        values=_fresh_direct(w, v, own), content=b"\x0f"
    ),
    ("POST", "directreplication/slave/{agentId}/{jobId}/{sessionId}/o3edata"): lambda w, v, own: (
        Req(values=_direct(v), content=b"", headers={"X-O3E-Block-Index": "0"})
    ),
    ("POST", "slave/{agentId}/{jobId}/{sessionId}/records/keys"): lambda w, v, own: Req(
        content=protocol.encode_keys([])
    ),
    ("POST", "slave/{agentId}/{jobId}/{sessionId}/records/rawdata"): lambda w, v, own: Req(
        content=protocol.encode_records_header(0)
    ),
    ("DELETE", "slave/{agentId}/{jobId}/{sessionId}?commit={commit}"): lambda w, v, own: Req(
        values=_fresh_session(w, v, own)
    ),
    ("DELETE", "slave/agents/{agentId}"): lambda w, v, own: Req(
        values={"agentId": "a-doomed"} if own else {}
    ),
    ("GET", "slave/agents/{agentId}/{jobId}/{sessionId}/fileinfo"): lambda w, v, own: Req(
        values=_direct(v)
    ),
    (
        "GET",
        "slave/agents/{agentId}/{jobId}/{sessionId}/repoconnectiondescription",
    ): lambda w, v, own: Req(values=_direct(v)),
    ("POST", "slave/agents/{agentId}/metadataUpdate"): lambda w, v, own: Req(json=META),
    ("DELETE", "slave/agents/{agentId}/metadataUpdate"): _with_metadata_update,
    ("GET", "slave/agents/{agentId}/metadataUpdate/status"): _with_metadata_update,
    ("POST", "slave/agents/{agentId}/metadataUpdateJob"): lambda w, v, own: Req(
        json={**META, "jobId": f"meta-{next(w.counter)}"}
    ),
    ("PUT", "slave/agents/{agentId}/status"): lambda w, v, own: Req(json={"message": "matrix"}),
    ("POST", "slave/agents/{agentId}/transferJob/{jobId}"): lambda w, v, own: Req(json={}),
    ("POST", "slave/agents/demand"): lambda w, v, own: Req(json=_fresh_agents(w)),
    # A retried start of the side's running job (a new job would supersede it).
    ("POST", "slave/agents/replicationJob/start"): lambda w, v, own: Req(json=az.job_body(v)),
    ("POST", "slave/agents/replicationJob/sync"): lambda w, v, own: Req(json={"id": v["jobId"]}),
    ("POST", "slave/agents/request"): lambda w, v, own: Req(json=_fresh_agents(w)),
    ("PUT", "slave/cores/agentRepositoryRelationshipsByCoreInfo"): lambda w, v, own: Req(
        json={"masterCoreInfo": {"id": v["coreId"]}}
    ),
    ("PUT", "slave/cores/agentRepositoryRelationshipsByDemandByCoreInfo"): lambda w, v, own: Req(
        json={"masterCoreInfo": {"id": v["coreId"]}}
    ),
    ("POST", "slave/demand/agents/verify"): lambda w, v, own: Req(json=_fresh_agents(w)),
    ("POST", "slave/directreplicationsessions/new"): lambda w, v, own: Req(
        json=_session_body(w, v)
    ),
    ("POST", "slave/exchange/dllinfo/{fileName}"): lambda w, v, own: Req(
        content=b"MZ but not a DLL"
    ),
    ("POST", "slave/newsession/"): lambda w, v, own: Req(
        json={"fileName": "ese.dll", "size": 8, "md5": "0" * 32, "purpose": "exchange-dll"}
    ),
    ("POST", "slave/pairing/demand"): lambda w, v, own: Req(
        json=pairing_body(w.fresh_identity("demand"), ["d-web01"])
    ),
    ("POST", "slave/pairing/request"): lambda w, v, own: Req(
        json=pairing_body(w.fresh_identity("request"), ["r-web01"])
    ),
    ("DELETE", "slave/pairing?deleteRecoveryPoints={deleteRecoveryPoints}"): _unpair_own,
    ("POST", "slave/replication/verifyStart/?useCredentials={useCredentials}"): lambda w, v, own: (
        Req(
            json={
                "masterCoreInfo": pairing_body(w.a.source, [])["pairingRequest"]["masterCoreInfo"]
            }
        )
    ),
    ("POST", "slave/request/agents/verify"): lambda w, v, own: Req(json=_fresh_agents(w)),
    ("POST", "slave/sessions/{uploadSessionId}/"): lambda w, v, own: Req(
        values=_fresh_upload(w, v, own)
    ),
    ("DELETE", "slave/sessions/{uploadSessionId}/"): lambda w, v, own: Req(
        values=_fresh_upload(w, v, own)
    ),
    ("POST", "slave/sessions/{uploadSessionId}/data/{dataSize}"): lambda w, v, own: Req(
        content=b"1234", headers={"X-Upload-Offset": "0"}
    ),
    ("POST", "slave/sessions/new"): lambda w, v, own: Req(json=_session_body(w, v)),
    ("DELETE", "slave/start/{agentId}/{jobId}/{sessionId}?commit={commit}"): _start_end,
    ("PUT", "slave/storage"): lambda w, v, own: Req(json={"agents": []}),
}


def build(key: tuple[str, str], w: az.World, v: dict[str, str], own: bool) -> Req:
    builder = REQUESTS.get(key)
    return builder(w, v, own) if builder else Req()


def target(key: tuple[str, str], values: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The concrete path and query of seed operation `key`."""
    path, _, query = key[1].partition("?")
    params = {}
    for part in filter(None, query.split("&")):
        name, _, placeholder = part.partition("=")
        params[name] = values[placeholder.strip("{}")]
    return path.format_map(values), params


def send(
    c: httpx.Client, key: tuple[str, str], req: Req, values: dict[str, str], garbage: bool = False
) -> httpx.Response:
    path, params = target(key, {**values, **req.values})
    kwargs: dict[str, Any] = {"params": params, "headers": dict(req.headers)}
    if garbage:
        kwargs["content"] = GARBAGE
        kwargs["headers"]["Content-Type"] = "application/json"
    elif req.json is not None:
        kwargs["json"] = req.json
    elif req.content is not None:
        kwargs["content"] = req.content
        kwargs["headers"].setdefault("Content-Type", "application/octet-stream")
    return c.request(key[0], path, **kwargs)


def verdict(expected: str, response: httpx.Response) -> str | None:
    """None when `response` is the expected answer, else what is wrong."""
    status = response.status_code
    if expected == "ok":
        if status < 500 and status not in (401, 403, 404):
            return None
    elif status == int(expected):
        body = response.json()
        if body.get("error") and body.get("message"):
            return None
        return f"{status} without a JSON error body: {response.text[:200]}"
    return f"expected {expected}, got {status}: {response.text[:300]}"


# --------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------


def test_matrix_covers_every_seed_operation_once():
    keys = {az.seed_key(m, p) for m, p in seed_operations()}
    assert len(seed_operations()) == 59
    assert keys == set(az.MATRIX), keys ^ set(az.MATRIX)
    assert set(REQUESTS) <= set(az.MATRIX)


def test_each_rows_cells_follow_from_its_declared_level():
    for key, (level, _) in az.MATRIX.items():
        row = az.cells(key)
        first = " ".join(row[c] for c in az.CALLERS[:5])
        admin = " ".join(row[c] for c in ("admin", "bad_password"))
        if key in az.EXCEPTIONS:
            continue
        assert first == az.LEVEL_CELLS[level], key
        assert admin == az.LEVEL_ADMIN_CELLS[level], key
        assert row["cross"] in ("-", "404", "403"), key
        assert row["cross"] == "-" or level.startswith("paired_source"), key


def test_security_doc_shows_the_matrix():
    assert az.doc_table() == az.render_markdown(), (
        "docs/api/security.md is out of date: run python tests/authz_helpers.py --write"
    )


@pytest.mark.parametrize("key", sorted(az.MATRIX), ids=lambda k: f"{k[0]} {k[1]}")
def test_authorization_matrix(world, key):
    level, _ = az.MATRIX[key]
    row = az.cells(key)
    server, a_values = world.server, world.a.values()
    failures: list[str] = []

    def check(caller: str, response: httpx.Response) -> None:
        problem = verdict(row[caller], response)
        if problem:
            failures.append(f"{caller}: {problem}")

    # The route declares the level the table says.
    app_level = declared_level(world, key)
    assert app_level == level.removesuffix("+admin"), f"the route declares {app_level}"
    with_admin = level.endswith("+admin")

    # Refused cells first: none of them may change anything.
    before = az.snapshot(server)
    problem = az.handshake_refused(server, world.stranger, key[0], target(key, a_values)[0])
    if problem:
        failures.append(f"stranger: not refused at the handshake, got {problem}")
    callers = {
        "none": lambda: az.client(server),
        "pending": lambda: az.client(server, world.pending),
        "denied": lambda: az.client(server, world.denied),
        "own": lambda: az.client(server, world.a.source),
        "admin": lambda: az.client(server),
        "bad_password": lambda: az.client(server, local_address=next(_addresses)),
    }
    auth_for = {"admin": world.admin, "bad_password": (world.admin[0], WRONG_PASSWORD)}
    if with_admin:
        auth_for["own"] = world.admin
        for password, label in ((None, "without credentials"), (WRONG_PASSWORD, "bad password")):
            with az.client(server, world.a.source, local_address=next(_addresses)) as c:
                c.auth = (world.admin[0], password) if password else None
                response = send(c, key, build(key, world, a_values, False), a_values, True)
            problem = verdict("401", response)
            if problem:
                failures.append(f"own {label}: {problem}")
    for caller, make in callers.items():
        if row[caller] in ("401", "403", "404"):
            with make() as c:
                c.auth = auth_for.get(caller)
                req = build(key, world, a_values, own=False)
                check(caller, send(c, key, req, a_values, garbage=True))
    if row["cross"] != "-":
        check_cross(world, key, row["cross"], failures, world.admin if with_admin else None)
    after = az.snapshot(server)
    changed = sorted(t for t in set(before) | set(after) if before.get(t) != after.get(t))
    if changed:
        failures.append(f"refused requests changed tables {changed}")

    # Then the cells that are let through.
    for caller, make in callers.items():
        if row[caller] == "ok":
            req = build(key, world, a_values, own=(caller == "own"))
            source = req.source if caller == "own" and req.source is not None else None
            with az.client(server, source) if source is not None else make() as c:
                c.auth = auth_for.get(caller)
                response = send(c, key, req, a_values)
                check(caller, response)
                if req.after is not None:
                    req.after(response)
    assert not failures, "\n".join(failures)


def declared_level(world: az.World, key: tuple[str, str]) -> str | None:
    """The access level the server's route for `key` declares (from its OpenAPI document)."""
    document = world.openapi
    path = "/" + key[1].split("?")[0]
    for candidate, item in document["paths"].items():
        aliases = [candidate, *item.get(key[0].lower(), {}).get("x-replicore-aliases", [])]
        for name in aliases:
            if name.rstrip("/") == path.rstrip("/") and key[0].lower() in item:
                level: str = item[key[0].lower()]["x-replicore-access"]
                return level
    return None


def check_cross(
    world: az.World,
    key: tuple[str, str],
    expected: str,
    failures: list[str],
    credentials: tuple[str, str] | None,
) -> None:
    """A on B's resource: the expected refusal, the same answer as for a resource that does
    not exist, and the same again with a garbage body (the check comes before the body)."""
    b_values, unknown = world.b.values(), az.unknown_values(world.b)
    names = {b_values[k]: f"<{k}>" for k in az.RESOURCE_VALUES}
    unknown_names = {unknown[k]: f"<{k}>" for k in az.RESOURCE_VALUES}
    with az.client(world.server, world.a.source) as c:
        c.auth = credentials
        cross = send(c, key, build(key, world, b_values, own=False), b_values)
        missing = send(c, key, build(key, world, unknown, own=False), unknown)
    problem = verdict(expected, cross)
    if problem:
        failures.append(f"cross: {problem}")
        return
    seen = (cross.status_code, az.normalise(cross.json()["message"], names))
    absent = (missing.status_code, az.normalise(missing.json()["message"], unknown_names))
    if seen != absent:
        failures.append(f"cross: B's resource answers {seen}, a missing one {absent}")


@pytest.fixture(scope="module", autouse=True)
def _openapi(world):
    with world.client() as c:
        response = c.get("openapi.json")
    assert response.status_code == 200, response.text
    world.openapi = response.json()


PATH_RESOURCE_ROWS = [
    k for k in sorted(az.MATRIX) if az.cells(k)["cross"] == "404" and "{" in k[1].split("?")[0]
]


@pytest.mark.parametrize("key", PATH_RESOURCE_ROWS, ids=lambda k: f"{k[0]} {k[1]}")
def test_another_sources_resource_is_refused_before_the_body_is_read(world, key):
    b_values = world.b.values()
    before = az.snapshot(world.server)
    with az.client(world.server, world.a.source) as c:
        response = send(c, key, build(key, world, b_values, own=False), b_values, garbage=True)
    assert response.status_code == 404, response.text
    assert az.snapshot(world.server) == before


def test_a_source_never_sees_another_sources_agents_in_lists(world):
    with world.client(world.a.source) as c:
        listed = [
            c.get("slave/agents", params={"view": "all"}).text,
            c.get("slave/replicatedagents/rpsinfo").text,
            c.get("slave/repositories").text,
            c.get("slave/cores/agentRepositoryRelationships").text,
        ]
    for text in listed:
        assert world.b.agent not in text and world.b.core_id not in text, text


# --------------------------------------------------------------------------
# Administrator logins: rate limit and audit
# --------------------------------------------------------------------------


def audit_entries(world: az.World, *args: str) -> list[dict[str, Any]]:
    result = world.server.cli("audit", "--json", *args)
    assert result.status == 0, result.stderr
    entries: list[dict[str, Any]] = json.loads(result.stdout)
    return entries


def masters(world: az.World, address: str, password: str) -> httpx.Response:
    with az.client(world.server, local_address=address) as c:
        return c.get("slave/cores/masters", auth=(world.admin[0], password))


def test_failed_admin_logins_are_limited_per_address_with_a_clear_429(world):
    address, other = next(_addresses), next(_addresses)
    for _ in range(auth.FAILED_LOGINS_PER_WINDOW):
        assert masters(world, address, WRONG_PASSWORD).status_code == 401
    limited = masters(world, address, WRONG_PASSWORD)
    assert limited.status_code == 429
    assert limited.json()["error"] == "too_many_requests"
    assert "too many failed administrator logins" in limited.json()["message"]
    assert 0 < int(limited.headers["Retry-After"]) <= auth.FAILED_LOGIN_WINDOW + 1
    # The right password is refused too from that address, not from another one.
    assert masters(world, address, world.admin[1]).status_code == 429
    assert masters(world, other, world.admin[1]).status_code == 200
    refused = [
        e for e in audit_entries(world, "--action", "admin.login") if e["clientAddress"] == address
    ]
    outcomes = [e["outcome"] for e in refused]
    assert outcomes == ["failed"] * auth.FAILED_LOGINS_PER_WINDOW + ["refused"]


def test_parallel_guesses_cannot_outrun_the_login_limit(world):
    address = next(_addresses)
    with ThreadPoolExecutor(12) as pool:
        codes = list(
            pool.map(lambda _: masters(world, address, WRONG_PASSWORD).status_code, range(30))
        )
    assert codes.count(401) == auth.FAILED_LOGINS_PER_WINDOW
    assert codes.count(429) == 30 - auth.FAILED_LOGINS_PER_WINDOW


def test_admin_logins_are_audited_with_address_and_never_the_password(world):
    address = next(_addresses)
    since = time.time() - 1
    assert masters(world, address, world.admin[1]).status_code == 200
    assert masters(world, address, WRONG_PASSWORD).status_code == 401
    with az.client(world.server, local_address=address) as c:
        bad_user = c.get("slave/cores/masters", auth=("mallory", WRONG_PASSWORD))
    assert bad_user.status_code == 401
    mine = [
        e
        for e in audit_entries(
            world, "--since", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since))
        )
        if e["clientAddress"] == address
    ]
    assert [(e["actor"], e["action"], e["outcome"]) for e in mine] == [
        ("api:admin", "admin.login", "ok"),
        ("api:admin", "admin.login", "failed"),
        ("api:mallory", "admin.login", "failed"),
    ]
    assert mine[0]["details"] == {
        "method": "GET",
        "path": "/apprecovery/api/core/replicationcomms/slave/cores/masters",
    }
    assert WRONG_PASSWORD not in json.dumps(audit_entries(world))
    assert WRONG_PASSWORD not in world.server.log_path.read_text()


def test_operator_commands_are_audited_and_listed_since(world):
    server = world.server
    last = max((e["id"] for e in audit_entries(world)), default=0)
    first, second, third = (world.fresh_identity(n) for n in ("op1", "op2", "op3"))
    ids = [
        request_pairing(server, s, [f"{n}-web01"])["requestId"]
        for s, n in ((first, "o1"), (second, "o2"), (third, "o3"))
    ]
    assert server.cli("repository", "create", "audited", "--quota", "1G").status == 0
    assert server.cli("repository", "quota", "audited", "2G").status == 0
    assert server.cli("pairing", "approve", str(ids[0]), "--repository", "audited").status == 0
    assert server.cli("pairing", "deny", str(ids[1]), "--reason", "unknown").status == 0
    assert server.cli("pairing", "ignore", str(ids[2])).status == 0
    added = server.cli("admin", "add", "second", "--password-stdin", stdin="longpassword1\n")
    assert added.status == 0
    assert server.cli("admin", "remove", "second").status == 0
    # A failed command changes nothing and writes no row.
    assert server.cli("pairing", "approve", "999999").status != 0

    entries = audit_entries(world, "--since", "1m")
    new = [e for e in entries if e["id"] > last]
    ours = [(e["action"], e["target"], e["outcome"]) for e in new]
    assert ours == [
        ("repository.create", "audited", "ok"),
        ("repository.quota", "audited", "ok"),
        ("pairing.approve", f"request {ids[0]}", "ok"),
        ("pairing.deny", f"request {ids[1]}", "ok"),
        ("pairing.ignore", f"request {ids[2]}", "ok"),
        ("admin.add", "second", "ok"),
        ("admin.remove", "second", "ok"),
    ]
    by_action = {e["action"]: e for e in new}
    assert by_action["pairing.approve"]["details"] == {
        "coreId": first.core_id,
        "agents": {"o1-web01": "audited"},
    }
    assert by_action["pairing.deny"]["details"]["reason"] == "unknown"
    assert by_action["repository.quota"]["details"] == {"quotaBytes": 2 * 1024**3}
    assert all(e["actor"].startswith("cli:") for e in by_action.values())
    # --since in the future lists nothing; the table form shows the same rows.
    assert audit_entries(world, "--since", "2999-01-01") == []
    table = server.cli("audit", "--since", "1m", "--action", "pairing.")
    assert table.status == 0 and "pairing.deny" in table.stdout and "admin.add" not in table.stdout


def test_inventory_and_maintenance_commands_are_audited(world):
    server = world.server
    last = max((e["id"] for e in audit_entries(world)), default=0)
    for args in (
        ("agents", "pause", world.b.agent),
        ("agents", "resume", world.b.agent),
        ("retention", "set", "--agent", world.b.agent, "--daily", "7"),
        ("retention", "set", "--agent", world.b.agent, "--inherit"),
        ("verify", "--agent", world.b.agent),
        ("gc",),
    ):
        result = server.cli(*args)
        assert result.status == 0, (args, result.stderr)
    actions = [(e["action"], e["target"]) for e in audit_entries(world) if e["id"] > last]
    who = f"agent {world.b.agent} of source {world.b.core_id}"
    assert actions == [
        ("agent.pause", who),
        ("agent.resume", who),
        ("retention.set", f"agent {world.b.agent}"),
        ("retention.set", f"agent {world.b.agent}"),
        ("verify.run", world.b.agent),
        ("gc.run", ""),
    ]


def test_audit_since_takes_durations_and_iso_times_and_refuses_others(world):
    assert world.server.cli("audit", "--since", "2h").status == 0
    assert world.server.cli("audit", "--since", "2026-01-01T00:00:00Z").status == 0
    bad = world.server.cli("audit", "--since", "last tuesday")
    assert bad.status == 2 and "--since" in bad.stderr
