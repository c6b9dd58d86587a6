"""Every operation of the seed list (docs/seed-endpoints.txt, a copy of the original
product's replicationcomms operation list) is served by exactly one route that declares its
access level, and docs/api.md names every route."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from replicore import auth
from replicore.app import create_app
from replicore.cli.serve import prepare_state
from replicore.config import parse
from replicore.runtime import Runtime
from replicore.server import TrustStore
from replicore.store.db import Database

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "docs" / "seed-endpoints.txt"
SAMPLES = {
    "agentId": "agent-1",
    "jobId": "job-1",
    "sessionId": str(uuid.uuid4()),
    "uploadSessionId": str(uuid.uuid4()),
    "volumeDriverId": "vol-1",
    "epochNumber": "3",
    "skipCount": "0",
    "maxCount": "10",
    "fileName": "ese.dll",
    "dataSize": "16",
}


def seed_operations() -> list[tuple[str, str]]:
    found = []
    for line in SEED.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("replicationcomms/") and parts[1].isupper():
            found.append((parts[1], parts[0]))
    return found


def concrete(path: str) -> str:
    path = path.split("?", 1)[0]
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLES[m.group(1)], path)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    state = tmp_path_factory.mktemp("routes")
    config = parse({"server": {"state_dir": str(state), "listen": "127.0.0.1:0"}})
    core_id, cert, key = prepare_state(config)
    db = Database(config.database_path, readers=1)
    runtime = Runtime(
        config=config, db=db, trust=TrustStore(cert, key), core_id=core_id, server_fingerprint=""
    )
    yield create_app(runtime)
    db.close()


def test_seed_list_has_all_59_operations():
    assert len(seed_operations()) == 59


@pytest.mark.parametrize(("method", "path"), seed_operations())
def test_every_seed_operation_has_a_route_with_an_access_level(app, method, path):
    adapter = app.url_map.bind("localhost")
    prefix = app.extensions["replicore"].config.server.url_prefix
    endpoint, _ = adapter.match(f"{prefix}/{concrete(path)}", method=method)
    view = app.view_functions[endpoint]
    assert getattr(view, auth.ACCESS_ATTRIBUTE, None) in {
        "anonymous",
        "known_source",
        "paired_source",
        "admin",
    }, f"{endpoint} declares no access level"


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def test_every_route_is_documented(app):
    text = (ROOT / "docs" / "api.md").read_text()
    prefix = app.extensions["replicore"].config.server.url_prefix + "/replicationcomms/"
    missing = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(prefix):
            continue
        documented = re.sub(
            r"<(?:\w+:)?(\w+)>",
            lambda m: "{" + camel(m.group(1)) + "}",
            rule.rule.removeprefix(prefix),
        )
        if documented.rstrip("/") not in text:
            missing.append(documented)
    assert not missing, f"routes missing from docs/api.md: {missing}"
