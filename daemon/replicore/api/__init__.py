"""The replicationcomms endpoints, one module per area of the seed list.

A module's routes are named after the URL they serve (see docs/api.md for the map); each
route declares its access level (`auth`) before it parses a body, then calls the store.
"""

from __future__ import annotations

from quart import Blueprint

from . import (
    agents,
    cores,
    direct,
    discovery,
    exchange,
    housekeeping,
    integrity,
    jobs,
    metadata,
    openapi,
    pairing,
    recovery_points,
    relationships,
    repositories,
    seed_drives,
    sessions,
    storage,
    uploads,
)

BLUEPRINTS: list[Blueprint] = [
    discovery.bp,
    pairing.bp,
    cores.bp,
    repositories.bp,
    agents.bp,
    recovery_points.bp,
    relationships.bp,
    housekeeping.bp,
    sessions.bp,
    jobs.bp,
    metadata.bp,
    uploads.bp,
    exchange.bp,
    storage.bp,
    seed_drives.bp,
    direct.bp,
    integrity.bp,
    openapi.bp,
]
