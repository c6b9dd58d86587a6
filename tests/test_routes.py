"""Every operation of the seed list (docs/seed-endpoints.txt, a copy of the original
product's replicationcomms operation list) is served by exactly one route that declares its
access level, and docs/api.md names every route."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from replicore import auth
from replicore.app import create_app
from replicore.config import parse
from replicore.daemon import prepare_state
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


def build_app(state_dir: str | Path) -> tuple[Any, Database]:
    """The real app over a fresh database in state_dir (close the Database after)."""
    config = parse({"server": {"state_dir": str(state_dir), "listen": "127.0.0.1:0"}})
    core_id, cert, key = prepare_state(config)
    db = Database(config.database_path, readers=1)
    runtime = Runtime(
        config=config, db=db, trust=TrustStore(cert, key), core_id=core_id, server_fingerprint=""
    )
    return create_app(runtime), db


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app, db = build_app(tmp_path_factory.mktemp("routes"))
    yield app
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


DOCS = {
    "discovery": "pairing",
    "pairing": "pairing",
    "cores": "pairing",
    "repositories": "pairing",
    "agents": "inventory",
    "recovery_points": "inventory",
    "relationships": "inventory",
    "sessions": "datapath",
    "uploads": "uploads",
    "exchange": "exchange",
    "jobs": "jobs",
    "metadata": "jobs",
    "storage": "storage",
    "seed_drives": "seed_drives",
    "direct": "direct",
    "openapi": "openapi",
}
INDEX_BEGIN, INDEX_END = "<!-- index:begin -->", "<!-- index:end -->"


def api_index(app) -> str:
    """The endpoint table of docs/api.md: method, path, access level, handler, details."""
    prefix = app.extensions["replicore"].config.server.url_prefix + "/replicationcomms/"
    lines = [
        "| method | path | access | handler | details |",
        "| --- | --- | --- | --- | --- |",
    ]
    entries = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(prefix):
            continue
        view = app.view_functions[rule.endpoint]
        module = view.__module__.rsplit(".", 1)[-1]
        path = re.sub(
            r"<(?:\w+:)?(\w+)>",
            lambda m: "{" + camel(m.group(1)) + "}",
            rule.rule.removeprefix(prefix),
        )
        access = getattr(view, auth.ACCESS_ATTRIBUTE, "?")
        doc = DOCS.get(module)
        details = f"[{doc}](api/{doc}.md)" if doc else ""
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            entries.append(
                (
                    path,
                    method,
                    f"| {method} | `{path}` | {access} | "
                    f"`api/{module}.py` `{view.__name__}` | {details} |",
                )
            )
    lines += [line for _, _, line in sorted(entries)]
    return "\n".join(lines)


def test_docs_api_index_matches_the_routes(app):
    text = (ROOT / "docs" / "api.md").read_text()
    begin, end = text.index(INDEX_BEGIN) + len(INDEX_BEGIN), text.index(INDEX_END)
    assert text[begin:end].strip() == api_index(app), (
        "docs/api.md's endpoint index is stale: run `python tests/test_routes.py --write`"
    )


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


if __name__ == "__main__":
    import sys
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_routes.py --write   (regenerates docs/api.md's index)")
    with tempfile.TemporaryDirectory() as state:
        built, database = build_app(state)
        index = api_index(built)
        database.close()
    docs = ROOT / "docs" / "api.md"
    text = docs.read_text()
    begin, end = text.index(INDEX_BEGIN) + len(INDEX_BEGIN), text.index(INDEX_END)
    docs.write_text(text[:begin] + "\n" + index + "\n" + text[end:])
