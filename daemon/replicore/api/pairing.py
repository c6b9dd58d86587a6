"""Pairing: `slave/pairing/request`, `slave/pairing/sync`, `slave/pairing/demand`,
`DELETE slave/pairing`."""

from __future__ import annotations

from quart import Blueprint

bp = Blueprint("pairing", __name__)
