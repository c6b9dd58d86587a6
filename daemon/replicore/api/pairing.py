"""Pairing: `slave/pairing/request`, `slave/pairing/sync`, `slave/pairing/demand`,
`DELETE slave/pairing`.

The request bodies (`RequestBody`, `DemandBody`) and their checks live here too; the
anonymous `slave/replication/verifyStart/` (in discovery) reuses them to say whether a
pairing would be accepted.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from cryptography.hazmat.primitives import serialization
from quart import Blueprint, g

from .. import API_VERSION, auth, certs, runtime
from ..bodies import Struct, json_body
from ..errors import Forbidden, TooManyRequests, Unauthorized, Unprocessable
from ..store import agents, cores, recycle_bin, repositories
from ..store.agents import AGENT_ID_PATTERN, AgentRequest
from .discovery import parse_bool_arg

bp = Blueprint("pairing", __name__)

#: Largest pairing body (a certificate, some text, up to MAX_AGENTS agents).
BODY_LIMIT = 1024 * 1024
MAX_AGENTS = 1000
REQUEST_WINDOW = 3600.0
CERTIFICATE_FIELD = "pairingRequest.clientCertificate"
API_VERSION_FIELD = "pairingRequest.masterCoreInfo.apiVersion"

Name = Annotated[str, msgspec.Meta(max_length=255)]


class MasterCoreInfo(Struct):
    id: Annotated[str, msgspec.Meta(pattern=AGENT_ID_PATTERN)]
    host_name: Name = ""
    version: Annotated[str, msgspec.Meta(max_length=64)] = ""
    #: The replicationcomms API version the source speaks (same major as ours to pair).
    api_version: Annotated[str, msgspec.Meta(max_length=32)] = ""
    is_replication_only_repository_supported: bool = False


class PairingRequest(Struct):
    client_certificate: Annotated[str, msgspec.Meta(max_length=16384)]
    master_core_info: MasterCoreInfo


class AgentInfo(Struct):
    id: Annotated[str, msgspec.Meta(pattern=AGENT_ID_PATTERN)]
    display_name: Name = ""
    host_name: Name = ""
    repository_type: Annotated[str, msgspec.Meta(max_length=64)] = ""


class RequestedAgent(Struct):
    agent_info: AgentInfo


class DemandedAgent(Struct):
    agent_info: AgentInfo
    #: The repository this agent goes to (default: the body's repositoryName).
    repository_name: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class _PairingBody(Struct):
    pairing_request: PairingRequest
    customer_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    email_address: Annotated[str, msgspec.Meta(max_length=254, pattern=r"^$|^[^@\s]+@[^@\s]+$")] = (
        ""
    )
    comments: Annotated[str, msgspec.Meta(max_length=4096)] = ""


class VerifyStartBody(Struct):
    master_core_info: MasterCoreInfo
    client_certificate: Annotated[str, msgspec.Meta(max_length=16384)] | None = None


class RequestBody(_PairingBody):
    agents: Annotated[list[RequestedAgent], msgspec.Meta(max_length=MAX_AGENTS)] = []


class DemandBody(_PairingBody):
    agents: Annotated[list[DemandedAgent], msgspec.Meta(max_length=MAX_AGENTS)] = []
    #: The repository for every agent without its own choice (default: the source's own).
    repository_name: Annotated[str, msgspec.Meta(max_length=64)] | None = None


def api_major(version: str) -> str:
    return version.strip().split(".", 1)[0]


def api_version_compatible(version: str) -> bool:
    """A source speaking `version` may pair: same major version as ours."""
    return api_major(version) == api_major(API_VERSION)


def accepted_certificate(pem: str) -> tuple[str, str]:
    """(normalised PEM, SHA-256 fingerprint) of a source certificate, or 422 naming the field."""
    try:
        cert = certs.check_client_certificate(pem)
    except certs.CertificateError as error:
        raise Unprocessable(f"clientCertificate: {error}", field=CERTIFICATE_FIELD) from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii"), certs.fingerprint_der(der)


def check_api_version(info: MasterCoreInfo) -> None:
    if info.api_version and not api_version_compatible(info.api_version):
        raise Unprocessable(
            f"this core speaks API version {API_VERSION}; version {info.api_version} "
            "cannot pair with it",
            field=API_VERSION_FIELD,
        )


def source_info(body: _PairingBody) -> cores.SourceInfo:
    info = body.pairing_request.master_core_info
    check_api_version(info)
    return cores.SourceInfo(
        core_id=info.id,
        host_name=info.host_name,
        version=info.version,
        api_version=info.api_version,
        replication_only_repository=info.is_replication_only_repository_supported,
        customer_id=body.customer_id,
        email=body.email_address,
        comment=body.comments,
    )


def agent_requests(listed: list[RequestedAgent] | list[DemandedAgent]) -> list[AgentRequest]:
    seen: set[str] = set()
    wanted: list[AgentRequest] = []
    for index, entry in enumerate(listed):
        info = entry.agent_info
        if info.id in seen:
            raise Unprocessable(
                f"agent {info.id!r} is listed twice", field=f"agents[{index}].agentInfo.id"
            )
        seen.add(info.id)
        repository = getattr(entry, "repository_name", None)
        if repository is not None:
            try:
                repositories.check_name(repository)
            except Unprocessable as error:
                raise Unprocessable(
                    error.message, field=f"agents[{index}].repositoryName"
                ) from None
        wanted.append(
            AgentRequest(
                agent_id=info.id,
                display_name=info.display_name,
                host_name=info.host_name,
                repository_type=info.repository_type,
                repository=repository,
            )
        )
    return wanted


def check_accepting_requests() -> None:
    if not runtime.current().config.pairing.accept_requests:
        raise Forbidden(
            "this core does not accept pairing requests; an administrator can pair by demand"
        )


def request_limiter() -> Any:
    rt = runtime.current()
    return rt.limiter("pairing-request", rt.config.pairing.requests_per_hour, REQUEST_WINDOW)


async def pairing_ability(*, by_demand: bool) -> dict[str, Any]:
    """The answer of `slave/replication/verifyStart/`: whether the source in the body could
    pair now, by request or (by_demand) by demand with the Basic credentials, with reasons."""
    rt = runtime.current()
    body = await json_body(VerifyStartBody, BODY_LIMIT)
    reasons: list[str] = []
    api_version = body.master_core_info.api_version
    version_ok = bool(api_version) and api_version_compatible(api_version)
    if not api_version:
        reasons.append("masterCoreInfo.apiVersion is missing: say which API version you speak")
    elif not version_ok:
        reasons.append(f"this core speaks API version {API_VERSION}, not {api_version}")
    certificate_ok: bool | None = None
    if body.client_certificate is not None:
        try:
            _, fingerprint = accepted_certificate(body.client_certificate)
        except Unprocessable as error:
            certificate_ok = False
            reasons.append(error.message)
        else:
            certificate_ok = True
            core = await rt.db.read(cores.by_fingerprint, fingerprint)
            state = None if core is None else core["state"]
            if not by_demand and state in ("unconfirmed", "pending", "approved"):
                certificate_ok = False
                reasons.append(f"this certificate already has a pairing in state {state}")
    credentials_ok: bool | None = None
    if by_demand:
        try:
            await auth.check_admin()
            credentials_ok = True
        except Unauthorized:
            credentials_ok = False
            reasons.append("the administrator credentials are not valid")
    accepting = rt.config.pairing.accept_requests
    if not by_demand:
        if not accepting:
            reasons.append("this core does not accept pairing requests")
        elif await rt.db.read(cores.open_count) >= rt.config.pairing.max_pending:
            reasons.append("this core holds too many pairing requests awaiting a decision")
        elif request_limiter().blocked(auth.client_address()):
            reasons.append("too many pairing requests from this address; try again later")
    return {
        "coreId": rt.core_id,
        "apiVersion": API_VERSION,
        "method": "demand" if by_demand else "request",
        "canPair": not reasons,
        "reasons": reasons,
        "versionCompatible": version_ok,
        "certificateAcceptable": certificate_ok,
        "credentialsValid": credentials_ok,
        "requestsAccepted": accepting,
    }


@bp.post("/slave/pairing/request")
@auth.anonymous
async def request_pairing() -> tuple[dict[str, Any], int]:
    """Anonymous: ask to pair; the certificate in the body is trusted for pairing/sync from
    now on, and the request waits unconfirmed until the source syncs with it."""
    rt = runtime.current()
    check_accepting_requests()
    limiter, address = request_limiter(), auth.client_address()
    if limiter.blocked(address):
        raise TooManyRequests(
            "too many pairing requests from this address; try again later",
            retry_after=limiter.retry_after(address),
        )
    body = await json_body(RequestBody, BODY_LIMIT)
    pem, fingerprint = accepted_certificate(body.pairing_request.client_certificate)
    info, wanted = source_info(body), agent_requests(body.agents)
    core = await rt.db.write(
        cores.submit_request,
        fingerprint=fingerprint,
        certificate=pem,
        info=info,
        wanted=wanted,
        client_address=address,
        now=time.time(),
        ttl=rt.config.pairing.unconfirmed_ttl,
        max_pending=rt.config.pairing.max_pending,
    )
    limiter.record(address)
    rt.trust.add(pem)
    return {
        "requestId": core["id"],
        "coreId": rt.core_id,
        "state": cores.STATE_NAMES[core["state"]],
        "pairingState": core["state"],
        "clientCertificateFingerprint": fingerprint,
        "message": "request received; call pairing/sync with this certificate to confirm it",
    }, 202


@bp.post("/slave/pairing/sync")
@auth.known_source
async def sync() -> dict[str, Any]:
    """A known certificate: the state of its pairing (its first call confirms the request)."""
    rt = runtime.current()
    core = await rt.db.write(
        cores.confirm, g.core["id"], time.time(), rt.config.pairing.unconfirmed_ttl
    )
    if core is None:
        raise Unauthorized(
            "this pairing request expired before it was confirmed; request pairing again"
        )
    return await rt.db.read(cores.describe, core, rt.core_id)


@bp.post("/slave/pairing/demand")
@auth.admin
async def demand() -> dict[str, Any]:
    """Administrator: pair the source whose certificate is in the body, at once."""
    rt = runtime.current()
    body = await json_body(DemandBody, BODY_LIMIT)
    pem, fingerprint = accepted_certificate(body.pairing_request.client_certificate)
    info, wanted = source_info(body), agent_requests(body.agents)
    if body.repository_name is not None:
        try:
            repositories.check_name(body.repository_name)
        except Unprocessable as error:
            raise Unprocessable(error.message, field="repositoryName") from None
    core = await rt.db.write(
        cores.demand,
        fingerprint=fingerprint,
        certificate=pem,
        info=info,
        wanted=wanted,
        repository=body.repository_name,
        client_address=auth.client_address(),
        decided_by=g.admin,
        now=time.time(),
    )
    rt.trust.add(pem)
    return await rt.db.read(cores.describe, core, rt.core_id)


@bp.delete("/slave/pairing")
@bp.delete("/slave/pairing/")
@auth.paired_source
async def unpair() -> dict[str, Any]:
    """Paired source: end the pairing. deleteRecoveryPoints=true also moves its agents and
    their recovery points to the recycle bin (store/recycle_bin.py)."""
    rt = runtime.current()
    delete = parse_bool_arg("deleteRecoveryPoints")
    core = await rt.db.write(
        recycle_bin.unpair, g.core["id"], delete_recovery_points=delete, now=time.time()
    )
    return {
        "requestId": core["id"],
        "coreId": rt.core_id,
        "state": cores.STATE_NAMES[core["state"]],
        "pairingState": core["state"],
        "deleteRecoveryPointsRequested": delete,
        "agents": [a["agent_id"] for a in await rt.db.read(agents.for_core, core["id"])],
    }
