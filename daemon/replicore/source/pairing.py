"""Pairing from the source's side: pin the target, check its API version, ask to pair (by
request, confirmed at once by a sync with our certificate, or by demand with administrator
credentials), remember the target, and ask it later how the pairing stands.

Everything here is blocking (httpx.Client); the commands in `cli/source.py` call it.
"""

from __future__ import annotations

from typing import Any

import httpx

from .. import API_VERSION, __version__, certs
from . import connection
from .identity import Identity


class PairingError(RuntimeError):
    """The target refused, or answered something we cannot use; the message says which."""


def api_major(version: str) -> str:
    return version.strip().split(".", 1)[0]


def _answer(response: httpx.Response, what: str) -> dict[str, Any]:
    """The JSON answer of a successful call, else PairingError with the target's message."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and isinstance(body, dict):
        return body
    message = body.get("message") if isinstance(body, dict) else None
    raise PairingError(
        f"{what}: the target answered {response.status_code}: {message or response.text[:200]}"
    )


def summary(client: httpx.Client) -> dict[str, Any]:
    """The target's noPairingSummaryInfo; PairingError when its API version is not ours."""
    info = _answer(client.get("slave/cores/noPairingSummaryInfo"), "summary")
    theirs = str(info.get("apiVersion", ""))
    if api_major(theirs) != api_major(API_VERSION):
        raise PairingError(
            f"the target speaks API version {theirs or 'unknown'}; this replicore speaks "
            f"{API_VERSION} and cannot pair with it"
        )
    return info


def request_body(
    identity: Identity,
    agents: list[str],
    *,
    customer_id: str = "",
    email: str = "",
    comment: str = "",
) -> dict[str, Any]:
    return {
        "pairingRequest": {
            "clientCertificate": identity.certificate_pem,
            "masterCoreInfo": {
                "id": identity.core_id,
                "hostName": identity.host_name,
                "version": __version__,
                "apiVersion": API_VERSION,
                "isReplicationOnlyRepositorySupported": False,
            },
        },
        "customerId": customer_id,
        "emailAddress": email,
        "comments": comment,
        "agents": [{"agentInfo": {"id": agent, "displayName": agent}} for agent in agents],
    }


def pair(
    identity: Identity,
    url: str,
    fingerprint: str,
    agents: list[str],
    *,
    customer_id: str = "",
    email: str = "",
    comment: str = "",
    demand_credentials: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Pair with the target at `url` whose certificate has `fingerprint` (PinError if not).
    Returns the pairing as the target then sees it (pending by request, established by
    demand) and records the target in the identity directory."""
    url = url.rstrip("/")
    target_pem = connection.pin(url, fingerprint)
    body = request_body(identity, agents, customer_id=customer_id, email=email, comment=comment)
    with connection.client(url, target_pem, None) as anonymous:
        info = summary(anonymous)
        if demand_credentials is not None:
            answer = _answer(
                anonymous.post("slave/pairing/demand", json=body, auth=demand_credentials),
                "pairing by demand",
            )
        else:
            answer = _answer(anonymous.post("slave/pairing/request", json=body), "pairing request")
    identity.save_target(
        {
            "url": url,
            "coreId": info["coreId"],
            "certificate": target_pem,
            "fingerprint": certs.normalize_fingerprint(fingerprint),
            "requestId": answer.get("requestId"),
            "method": "demand" if demand_credentials is not None else "request",
        }
    )
    if demand_credentials is None:
        # Proves to the target that we hold the key: only now does its operator see us.
        answer = sync(identity, url)
    return answer


def sync(identity: Identity, url: str | None = None) -> dict[str, Any]:
    """The pairing state with a paired (or requested) target, through pairing/sync."""
    target = identity.find_target(url)
    with connection.client(target["url"], target["certificate"], identity) as client:
        answer = _answer(client.post("slave/pairing/sync"), "pairing status")
    answer["targetUrl"] = target["url"]
    return answer
