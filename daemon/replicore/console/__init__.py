"""The operator's web console, served by `replicore serve` on the API's TLS port under
`console.path` (default /apprecovery/admin) when `console.enabled` (the default).

Server-rendered pages (Jinja templates in templates/console/, one stylesheet in static/, no
JavaScript): dashboard, pairing requests, sources, agents and their recovery points, recycle
bin, jobs, audit log, billing. Administrators log in with their accounts; sessions, CSRF
tokens and the failed-login limit are in security.py, the gate every request passes in
web.py. Every action calls the same store functions as the matching `replicore` command and
writes the same audit log (store/audit.py), with actor `console:NAME`.

Modules: web (blueprint, gate, headers, errors, actions), security, login, dashboard,
pairing, sources, agents, bin, jobs, audit_log, billing (+ charts), sampler (usage history
for the billing chart), formatting (template filters). `bp` is what app.py registers.
"""

from __future__ import annotations

from . import (  # noqa: F401  (each registers its routes on bp)
    agents,
    audit_log,
    billing,
    bin,
    dashboard,
    jobs,
    login,
    pairing,
    sampler,
    sources,
)
from .web import bp

__all__ = ["bp"]
