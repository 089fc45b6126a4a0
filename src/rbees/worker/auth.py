"""Bearer-token check for the worker's job routes (``/health`` stays open)."""

from __future__ import annotations

import hmac

from rbees.protocol import ErrorCode, RbeesError


def check_bearer(expected: str | None, authorization: str | None) -> None:
    """Raise 401 unless ``authorization`` is ``Bearer <expected>``; no token configured = open."""
    if expected is None:
        return
    scheme, _, presented = (authorization or "").partition(" ")
    ok = hmac.compare_digest(presented.strip().encode(), expected.encode())
    if scheme.lower() != "bearer" or not ok:
        raise RbeesError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
