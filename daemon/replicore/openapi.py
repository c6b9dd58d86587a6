"""The OpenAPI 3.1 description of the replicationcomms API, built from the running app.

What the code knows is taken from it: every route of the app's URL map under the API root,
its methods, path parameters (with their converters), the access level its view declares
(`auth.ACCESS_ATTRIBUTE`: anonymous, known_source, paired_source, admin) and its docstring.
What a route does not say by itself, its request body and query parameters, comes from a
table of `RequestSpec`s keyed by endpoint name (api/openapi.py keeps it; a test checks that
every POST/PUT route is in it). Body schemas are the JSON Schemas of the handlers' msgspec
Structs (`msgspec.json.schema_components`), so they are the same types that decode the
bodies. Served at `GET {url_prefix}/replicationcomms/openapi.json` (docs/api/openapi.md).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import API_VERSION, PRODUCT, __version__, auth

OPENAPI_VERSION = "3.1.0"
ERROR_SCHEMA = "Error"
_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
_ARGUMENT = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")

#: What each access level lets in, and how it is refused.
ACCESS_TEXT = {
    "anonymous": "anyone over TLS",
    "known_source": "a source whose client certificate is on record (401 without one)",
    "paired_source": (
        "a paired source by its client certificate (401 without a known certificate, 403 "
        "while its pairing is not approved); it sees only its own agents, sessions and "
        "jobs (404 for another source's)"
    ),
    "admin": "an administrator by HTTP Basic credentials (401 otherwise, 429 after repeated "
    "failures from one address)",
}
_SECURITY = {
    "anonymous": [],
    "known_source": [{"clientCertificate": []}],
    "paired_source": [{"clientCertificate": []}],
    "admin": [{"adminBasic": []}],
}


@dataclass(frozen=True)
class Param:
    """One query or header parameter; `kind` is boolean (true/false, also 1/0, yes/no),
    integer (decimal digits) or string, or `choices` lists the values taken."""

    name: str
    description: str = ""
    kind: str = "boolean"
    required: bool = False
    where: str = "query"
    choices: tuple[str, ...] = ()


def header(name: str, description: str = "", **kwargs: Any) -> Param:
    return Param(name, description, where="header", **kwargs)


@dataclass(frozen=True)
class RequestSpec:
    """What a route reads besides its path: a JSON body (a msgspec Struct type, or its
    "module:Name" to import when the route exists), or a binary body (`binary` says what it
    holds), and query or header parameters."""

    body: Any = None
    binary: str | None = None
    body_required: bool = True
    params: tuple[Param, ...] = field(default_factory=tuple)
    #: "required": the handler also checks administrator credentials (the "by demand"
    #: operations); "optional": it checks them when sent (or when a parameter asks).
    admin_credentials: str = ""
    #: Why a body is needed only sometimes, or what it is (shown in the description).
    note: str = ""


NO_BODY = RequestSpec()


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def openapi_path(rule: str) -> tuple[str, list[tuple[str, str | None]]]:
    """A Werkzeug rule as an OpenAPI path, and its (camelCase name, converter) arguments."""
    arguments: list[tuple[str, str | None]] = []

    def replace(found: re.Match[str]) -> str:
        name = camel(found.group(2))
        arguments.append((name, found.group(1)))
        return "{" + name + "}"

    return _ARGUMENT.sub(replace, rule), arguments


def _path_parameter(name: str, converter: str | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "pattern": "^[^/]+$"}
    if converter == "uuid":
        schema = {"type": "string", "format": "uuid"}
    elif converter in ("int", "float"):
        schema = {"type": "integer" if converter == "int" else "number"}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _parameter(param: Param) -> dict[str, Any]:
    schema: dict[str, Any]
    if param.choices:
        schema = {"type": "string", "enum": list(param.choices)}
    elif param.kind == "boolean":
        schema = {"type": "string", "enum": ["true", "false"]}
    elif param.kind == "integer":
        schema = {"type": "string", "pattern": "^[0-9]{1,20}$"}
    else:
        schema = {"type": "string"}
    parameter: dict[str, Any] = {
        "name": param.name,
        "in": param.where,
        "required": param.required,
        "schema": schema,
    }
    if param.description:
        parameter["description"] = param.description
    return parameter


def resolve(body: Any) -> Any:
    """A body type given as "module:Name", imported."""
    if not isinstance(body, str):
        return body
    module, _, name = body.partition(":")
    return getattr(importlib.import_module(module), name)


def _security(level: str, admin_credentials: str) -> list[dict[str, list[str]]]:
    base = _SECURITY[level]
    if not admin_credentials or level == "admin":
        return base
    both = [{**(base[0] if base else {}), "adminBasic": []}]
    return both if admin_credentials == "required" else [*(base or [{}]), *both]


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}
        },
    }


def _responses(level: str, spec: RequestSpec, has_resource: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {"2XX": {"description": "success"}}
    if level != "anonymous":
        responses["401"] = _error("no (known) client certificate, or bad credentials")
    if level in ("known_source", "paired_source"):
        responses["403"] = _error("the caller's pairing is not approved")
    if has_resource:
        responses["404"] = _error("no such resource of the caller (another source's included)")
    if spec.body is not None or spec.binary is not None:
        responses["400"] = _error("malformed body")
        responses["413"] = _error("body over the size limit")
    responses["422"] = _error("a field or parameter has a bad value (`field` names it)")
    if level == "admin":
        responses["429"] = _error("too many failed administrator logins from this address")
    responses["default"] = _error("any other error (409 state, 507 storage full, ...)")
    return responses


def _docstring(view: Any) -> tuple[str, str]:
    text = " ".join((view.__doc__ or "").split())
    summary = text.split(". ")[0].rstrip(".")
    return summary[:200], text


def build(
    app: Any, specs: Mapping[str, RequestSpec], api_root: str, *, title: str = ""
) -> dict[str, Any]:
    """The OpenAPI document of the routes of `app` under `api_root` (the
    `{url_prefix}/replicationcomms` path), with request details from `specs`."""
    bodies = {e: resolve(s.body) for e, s in specs.items() if s.body is not None}
    bodies = {e: t for e, t in bodies.items() if e in app.view_functions}
    structs = sorted(set(bodies.values()), key=lambda t: f"{t.__module__}.{t.__qualname__}")
    refs, components = msgspec.json.schema_components(
        structs, ref_template="#/components/schemas/{name}"
    )
    body_ref = dict(zip(structs, refs, strict=True))
    components[ERROR_SCHEMA] = {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "a stable code, e.g. unprocessable"},
            "message": {"type": "string", "description": "what was wrong, for a person"},
            "field": {"type": "string", "description": "the field or parameter at fault"},
        },
    }
    chosen: dict[tuple[str, str], Any] = {}
    aliases: dict[tuple[str, str], list[str]] = {}
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(api_root + "/"):
            continue
        for method in sorted(m for m in rule.methods or () if m in _METHODS):
            key = (rule.endpoint, method)
            # One operation per view and method; a trailing-slash twin is listed as an alias.
            if key in chosen:
                keep, other = sorted((chosen[key], rule), key=lambda r: r.rule.endswith("/"))
                chosen[key] = keep
                aliases.setdefault(key, []).append(other.rule.removeprefix(api_root))
            else:
                chosen[key] = rule
    paths: dict[str, dict[str, Any]] = {}
    for (endpoint, method), rule in sorted(chosen.items(), key=lambda kv: kv[1].rule):
        view = app.view_functions[endpoint]
        level = getattr(view, auth.ACCESS_ATTRIBUTE, None)
        if level is None:
            raise ValueError(f"{endpoint} declares no access level")
        spec = specs.get(endpoint, NO_BODY)
        path, arguments = openapi_path(rule.rule.removeprefix(api_root))
        summary, description = _docstring(view)
        operation: dict[str, Any] = {
            "operationId": f"{method.lower()}_{endpoint.replace('.', '_')}",
            "tags": [endpoint.split(".")[0]],
            "summary": summary or endpoint,
            "description": f"{description}\n\nWho may call it: {ACCESS_TEXT[level]}."
            + (f"\n\n{spec.note}" if spec.note else ""),
            "security": _security(level, spec.admin_credentials),
            "x-replicore-access": level,
            "x-replicore-endpoint": endpoint,
            "parameters": [_path_parameter(n, c) for n, c in arguments]
            + [_parameter(q) for q in spec.params],
            "responses": _responses(level, spec, bool(arguments) and level == "paired_source"),
        }
        if (endpoint, method) in aliases:
            operation["x-replicore-aliases"] = sorted(aliases[(endpoint, method)])
        if spec.body is not None:
            operation["requestBody"] = {
                "required": spec.body_required,
                "content": {"application/json": {"schema": body_ref[bodies[endpoint]]}},
            }
        elif spec.binary is not None:
            operation["requestBody"] = {
                "required": spec.body_required,
                "description": spec.binary,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        paths.setdefault(path, {})[method.lower()] = operation
    _unique_operation_ids(paths)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title or f"{PRODUCT} replicationcomms API",
            "version": __version__,
            "x-api-version": API_VERSION,
            "description": (
                "The replication target API. TLS always; sources authenticate by client "
                "certificate, administrators by HTTP Basic. Authorization runs before a body "
                "is read. Errors are JSON {error, message, field?}."
            ),
        },
        "servers": [{"url": api_root}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "clientCertificate": {
                    "type": "mutualTLS",
                    "description": "the source's client certificate (pairing pins it)",
                },
                "adminBasic": {"type": "http", "scheme": "basic"},
            },
        },
    }


def _unique_operation_ids(paths: dict[str, dict[str, Any]]) -> None:
    seen: dict[str, int] = {}
    for item in paths.values():
        for operation in item.values():
            name = operation["operationId"]
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                operation["operationId"] = f"{name}_{seen[name]}"
