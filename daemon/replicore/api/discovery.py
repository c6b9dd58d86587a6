"""Anonymous discovery: `slave/validate/`, `slave/cores/noPairingSummaryInfo`,
`slave/replication/verifyStart/`.

What a source may learn before pairing: this core's id, name and API version, whether
administrator credentials are good, and whether it could pair now (the checks themselves
live with the pairing bodies in `pairing`).
"""

from __future__ import annotations

import socket
from typing import Any

from quart import Blueprint, request

from .. import API_VERSION, PRODUCT, __version__, auth, runtime
from ..errors import Unprocessable

bp = Blueprint("discovery", __name__)


def parse_bool_arg(name: str, default: bool = False) -> bool:
    value = request.args.get(name)
    if value is None or value == "":
        return default
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise Unprocessable(f"query parameter {name} must be true or false", field=name)


@bp.get("/slave/validate/")
@bp.get("/slave/validate")
@auth.anonymous
async def validate() -> dict[str, Any]:
    """Anonymous: the core id. With useCredentials=true the Basic credentials must be an
    administrator's (401 otherwise)."""
    use_credentials = parse_bool_arg("useCredentials")
    answer: dict[str, Any] = {"coreId": runtime.current().core_id}
    if use_credentials:
        answer["userName"] = await auth.check_admin()
        answer["credentialsValid"] = True
    return answer


def summary() -> dict[str, Any]:
    rt = runtime.current()
    return {
        "coreId": rt.core_id,
        "hostName": socket.gethostname(),
        "product": PRODUCT,
        "productVersion": __version__,
        "apiVersion": API_VERSION,
        "acceptsPairingRequests": rt.config.pairing.accept_requests,
        "serverCertificateFingerprint": rt.server_fingerprint,
    }


@bp.get("/slave/cores/noPairingSummaryInfo")
@auth.anonymous
async def no_pairing_summary_info() -> dict[str, Any]:
    """Anonymous: who this core is, before any pairing."""
    return summary()


@bp.post("/slave/replication/verifyStart/")
@bp.post("/slave/replication/verifyStart")
@auth.anonymous
async def verify_start() -> dict[str, Any]:
    """Anonymous: could this source pair now (by request; by demand with useCredentials=true,
    whose Basic credentials are checked), and if not, why. Changes nothing."""
    from . import pairing  # imported here: pairing imports this module

    return await pairing.pairing_ability(by_demand=parse_bool_arg("useCredentials"))
