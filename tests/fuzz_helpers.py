"""Property-based fuzzing of the API from its own OpenAPI document (schemathesis strategies,
driven by Hypothesis), sent over real TLS with the pinned certificate and a client
certificate. Used by tests/test_fuzz_api.py (bounded, CI) and tests/long/fuzz_api.py.

Why schemathesis for generation only: its own transport is `requests`, which cannot pin a
certificate by fingerprint without adapters; our httpx clients already do (and present the
source's certificate). So each generated `Case` is turned into an httpx request here.

Checks, per request: no 5xx (with the traceback from the server log) other than the
deliberate 507 (storage full) and 503 with a JSON error; an answer within
`TIMEOUT` seconds (no hang); and after any 4xx, a database equal to the one before the
request (tests/pairing_helpers.db_snapshot; the audit log is left out, since failed logins
are written there on purpose, and so are the few answers documented to keep partial
progress, ALLOWED_PARTIAL).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

import authz_helpers as az
from replicore.source import identity

TIMEOUT = 10.0
#: Endpoints whose 4xx answers may keep what was done before the error (documented).
ALLOWED_PARTIAL = {
    "datapath.record_data": "records before a bad one are kept (docs/api/datapath.md)",
    "direct.o3e_data": "blocks before a bad one are kept; the stream is resumable",
    "uploads.end_session": "a wrong MD5 or file fails the session for good and drops the file",
    "pairing.sync": "the first sync confirms the request even when it then expired",
}
#: Answers the API gives on purpose, with a JSON error: the disk or quota is full (507),
#: the server cannot take more of something right now (503).
DELIBERATE_5XX = (503, 507)
#: Run last: they take away what the other operations work on.
LAST = ("agents.delete_agent", "pairing.unpair")
#: The path parameters a case may name with the fuzzing source's real resources.
REAL_PARAMETERS = ("agentId", "jobId", "sessionId", "uploadSessionId", "volumeDriverId")


@dataclass
class Finding:
    kind: str  # 5xx | hang | db-changed | dropped
    operation: str
    caller: str
    request: str
    status: int | None = None
    answer: str = ""
    detail: str = ""

    def __str__(self) -> str:
        return (
            f"[{self.kind}] {self.operation} as {self.caller}: {self.request}\n"
            f"  -> {self.status} {self.answer[:300]}\n  {self.detail[:3000]}"
        )


@dataclass
class Caller:
    name: str
    source: identity.Identity | None = None
    credentials: tuple[str, str] | None = None


@dataclass
class Stats:
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    snapshot_seconds: float = 0.0
    per_endpoint: dict[str, int] = field(default_factory=dict)


def load_schema(server: Any) -> tuple[dict[str, Any], Any]:
    with az.client(server) as c:
        response = c.get("openapi.json")
    response.raise_for_status()
    document: dict[str, Any] = response.json()
    return document, schemathesis.openapi.from_dict(document)


def callers_for(operation: dict[str, Any], world: az.World) -> list[Caller]:
    """Who fuzzes an operation: the anonymous caller for anonymous ones, source A for source
    ones (with the administrator's credentials when the operation checks them too), the
    administrator for admin ones."""
    level = operation["x-replicore-access"]
    with_admin = any("adminBasic" in s for s in operation.get("security", []))
    if level == "anonymous":
        return [Caller("anonymous")] + ([Caller("admin", None, world.admin)] if with_admin else [])
    if level == "admin":
        return [Caller("admin", None, world.admin)]
    return [Caller("source A", world.a.source, world.admin if with_admin else None)]


class Fuzzer:
    def __init__(self, world: az.World, deadline: float, log_offset: int = 0) -> None:
        self.world = world
        self.deadline = deadline
        self.findings: list[Finding] = []
        self.stats = Stats()
        self._snapshot: dict[str, Any] | None = None
        self._clients: dict[str, httpx.Client] = {}

    def client(self, caller: Caller) -> httpx.Client:
        if caller.name not in self._clients:
            c = az.client(self.world.server, caller.source, timeout=TIMEOUT)
            c.auth = caller.credentials
            self._clients[caller.name] = c
        return self._clients[caller.name]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()

    def snapshot(self) -> dict[str, Any]:
        if self._snapshot is None:
            start = time.monotonic()
            self._snapshot = az.snapshot(self.world.server)
            self.stats.snapshot_seconds += time.monotonic() - start
        return self._snapshot

    def real_values(self, path: str) -> dict[str, str]:
        values = self.world.a.values()
        if path.startswith("/directreplication/") or path.endswith(
            ("/fileinfo", "/repoconnectiondescription")
        ):
            values["sessionId"] = values["directSessionId"]
        return values

    def send(self, operation: Any, spec: dict[str, Any], caller: Caller, case: Any, real: bool):
        if real:
            values = self.real_values(operation.path)
            for name in case.path_parameters or {}:
                if name in REAL_PARAMETERS:
                    case.path_parameters[name] = values[name]
        kwargs = case.as_transport_kwargs(base_url="")
        url = case.formatted_path.lstrip("/")
        headers = {
            k: v
            for k, v in (kwargs.get("headers") or {}).items()
            if k.lower() not in ("user-agent", "connection", "accept-encoding")
        }
        request: dict[str, Any] = {"params": kwargs.get("params"), "headers": headers}
        if "json" in kwargs:
            request["json"] = kwargs["json"]
        elif kwargs.get("data") is not None:
            data = kwargs["data"]
            request["content"] = data if isinstance(data, bytes) else str(data).encode()
        described = f"{case.method} {url} params={kwargs.get('params')} headers={headers} " + (
            f"json={json.dumps(request.get('json'))[:1500]}"
            if "json" in request
            else f"content={request.get('content', b'')[:300]!r}"
        )
        endpoint = spec["x-replicore-endpoint"]
        before = self.snapshot()
        client = self.client(caller)
        start = time.monotonic()
        try:
            response = client.request(case.method, url, **request)
        except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError, ValueError):
            return  # the client refused to send it (e.g. a header with a newline)
        except httpx.TimeoutException as error:
            self.findings.append(
                Finding("hang", endpoint, caller.name, described, detail=repr(error))
            )
            self._reset(caller)
            return
        except httpx.TransportError as error:
            self.findings.append(
                Finding("dropped", endpoint, caller.name, described, detail=repr(error))
            )
            self._reset(caller)
            return
        finally:
            self.stats.seconds += time.monotonic() - start
        self.stats.requests += 1
        self.stats.per_endpoint[endpoint] = self.stats.per_endpoint.get(endpoint, 0) + 1
        self.stats.statuses[response.status_code] = (
            self.stats.statuses.get(response.status_code, 0) + 1
        )
        status = response.status_code
        if status >= 500 and not (status in DELIBERATE_5XX and _json_error(response)):
            self.findings.append(
                Finding(
                    "5xx",
                    endpoint,
                    caller.name,
                    described,
                    status,
                    response.text,
                    self.server_log_tail(),
                )
            )
        if endpoint == "datapath.start_end_session" and 200 <= status < 300:
            self.settle_background_end(case)
        self._snapshot = None
        after = self.snapshot()
        if 400 <= status < 500 and endpoint not in ALLOWED_PARTIAL and after != before:
            changed = sorted(t for t in set(before) | set(after) if before.get(t) != after.get(t))
            self.findings.append(
                Finding(
                    "db-changed",
                    endpoint,
                    caller.name,
                    described,
                    status,
                    response.text,
                    f"tables changed: {changed}",
                )
            )

    def _reset(self, caller: Caller) -> None:
        client = self._clients.pop(caller.name, None)
        if client is not None:
            client.close()

    def settle_background_end(self, case: Any) -> None:
        """Wait for a background end the case started, so it cannot change the database
        while the next case's snapshot is compared."""
        path = case.formatted_path.removeprefix("/slave/start/")
        with az.client(self.world.server, self.world.a.source, timeout=TIMEOUT) as c:
            for _ in range(100):
                poked = c.post(f"slave/poke/{path}")
                if poked.status_code != 200 or poked.json() is True:
                    return
                time.sleep(0.05)

    def server_log_tail(self) -> str:
        text = self.world.server.log_path.read_text(errors="replace")
        index = text.rfind("Traceback")
        return text[max(0, index - 500) :][-4000:] if index >= 0 else text[-1500:]

    def fuzz(
        self,
        schema: Any,
        document: dict[str, Any],
        examples: int,
        modes: tuple[str, ...],
        per_round: int = 4,
    ) -> None:
        """Every operation x its callers x `modes`, in rounds of `per_round` cases each (so
        that every operation is reached early), until `examples` cases each or the
        deadline."""
        operations = [r.ok() for r in schema.get_all_operations()]
        spec_of = {
            (op.method.upper(), op.path): document["paths"][op.path][op.method.lower()]
            for op in operations
        }
        units: list[tuple[Any, dict[str, Any], Caller, Any, int]] = []
        for operation in operations:
            spec = spec_of[(operation.method.upper(), operation.path)]
            params = spec.get("parameters", [])
            has_input = bool(params) or "requestBody" in spec
            # A path parameter cannot be made invalid in a URL (it is always a string), so
            # negative cases need a body, a query or a header to break.
            negatable = "requestBody" in spec or any(p["in"] != "path" for p in params)
            for caller in callers_for(spec, self.world):
                for mode in modes if negatable else modes[:1]:
                    count = examples if has_input else 2  # nothing to vary
                    units.append((operation, spec, caller, GenerationMode(mode), count))
        last = [u for u in units if u[1]["x-replicore-endpoint"] in LAST]
        units = [u for u in units if u[1]["x-replicore-endpoint"] not in LAST]
        # The operations that take A's data away run once the others are done, in the
        # time kept for them.
        reserve = max(3.0, 0.05 * (self.deadline - time.monotonic()))
        done = 0
        while any(done < unit[4] for unit in units):
            for operation, spec, caller, mode, count in units:
                if done >= count:
                    continue
                if time.monotonic() > self.deadline - reserve:
                    break
                self._fuzz_one(operation, spec, caller, mode, min(per_round, count - done))
            done += per_round
        for operation, spec, caller, mode, count in last:
            if time.monotonic() > self.deadline:
                return
            self._fuzz_one(operation, spec, caller, mode, min(count, 2 * per_round))

    def _fuzz_one(
        self, operation: Any, spec: dict[str, Any], caller: Caller, mode: Any, examples: int
    ) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
        )
        @given(case=operation.as_strategy(generation_mode=mode), real=st.booleans())
        def run(case: Any, real: bool) -> None:
            if time.monotonic() > self.deadline:
                return
            self.send(operation, spec, caller, case, real)

        with contextlib.suppress(Unsatisfiable):  # nothing could be made invalid
            run()


def _json_error(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and bool(body.get("error")) and bool(body.get("message"))


@contextlib.contextmanager
def fuzzing(world: az.World, seconds: float) -> Iterator[Fuzzer]:
    fuzzer = Fuzzer(world, time.monotonic() + seconds)
    try:
        yield fuzzer
    finally:
        fuzzer.close()
