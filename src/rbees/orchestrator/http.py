"""HTTP plumbing shared by the routes: bearer checks and body parsing (the SSE response is
``rbees.httpd.EventStreamResponse``)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from rbees.httpd import MAX_BODY_BYTES, invalid_request, read_body
from rbees.orchestrator.service import JobService
from rbees.orchestrator.settings import OrchestratorSettings
from rbees.protocol import ErrorCode, RbeesError

log = logging.getLogger("rbees.orchestrator.http")


def service(request: Request) -> JobService:
    """The app's ``JobService`` (also what ``/v1`` routes use)."""
    svc: JobService = request.app.state.service
    return svc


def settings(request: Request) -> OrchestratorSettings:
    value: OrchestratorSettings = request.app.state.settings
    return value


# --- auth -----------------------------------------------------------------------------------------------


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def check_bearer(header: str, accepted: list[str], others: Sequence[str | None] = ()) -> None:
    """Raise unless ``header`` (an Authorization value) carries an accepted token: UNAUTHORIZED (401)
    with no token or one this orchestrator does not know, as the workers and the pool daemon answer;
    FORBIDDEN (403) for one of its ``others`` tokens (the registration token on a client route)."""
    if not accepted:
        return
    given = _bearer(header)
    if given is None:
        raise RbeesError(ErrorCode.UNAUTHORIZED, "this route needs 'Authorization: Bearer <token>'")
    if _matches(given, accepted):
        return
    if _matches(given, [t for t in others if t]):
        raise RbeesError(ErrorCode.FORBIDDEN, "this token is not valid on this route")
    raise RbeesError(ErrorCode.UNAUTHORIZED, "the bearer token is not valid")


def _matches(given: str, tokens: Sequence[str | None]) -> bool:
    ok = False
    for token in tokens:  # every one compared, in constant time
        if token:
            ok |= hmac.compare_digest(given.encode(), token.encode())
    return ok


def _check(request: Request, accepted: list[str]) -> None:
    if accepted:
        s = settings(request)
        check_bearer(request.headers.get("authorization", ""), accepted, (s.api_token, s.registration_token))


def require_client(request: Request) -> None:
    """Job and listing routes: the API token, when one is configured."""
    s = settings(request)
    _check(request, [s.api_token] if s.api_token else [])


def require_operator(request: Request) -> None:
    """Worker management: the API token or the registration token."""
    s = settings(request)
    _check(request, [t for t in (s.api_token, s.registration_token) if t])


def require_registration(request: Request) -> None:
    """The ready callback: the registration token; without one, the API token; without both, open."""
    s = settings(request)
    token = s.registration_token or s.api_token
    _check(request, [token] if token else [])


# --- errors ---------------------------------------------------------------------------------------------

Model = TypeVar("Model", bound=BaseModel)


def parse_body(model: type[Model], body: bytes) -> Model:
    """Validate a JSON body straight from bytes; failures are INVALID_REQUEST (400) like FastAPI's."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False, include_context=False)) from None


async def limited_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body; past ``limit`` bytes it is refused (400) as soon as it grows too big."""
    return await read_body(request.receive, limit)
