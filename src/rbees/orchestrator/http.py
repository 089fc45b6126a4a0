"""HTTP plumbing shared by the routes: bearer checks and body parsing (the SSE response is
``rbees.httpd.EventStreamResponse``)."""

from __future__ import annotations

import hmac
import logging
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from rbees.httpd import invalid_request
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


def check_bearer(header: str, accepted: list[str]) -> None:
    """Raise UNAUTHORIZED / FORBIDDEN unless ``header`` (an Authorization value) carries an accepted token."""
    if not accepted:
        return
    given = _bearer(header)
    if given is None:
        raise RbeesError(ErrorCode.UNAUTHORIZED, "this route needs 'Authorization: Bearer <token>'")
    ok = False
    for token in accepted:
        ok |= hmac.compare_digest(given.encode(), token.encode())
    if not ok:
        raise RbeesError(ErrorCode.FORBIDDEN, "the bearer token is not valid here")


def _check(request: Request, accepted: list[str]) -> None:
    if accepted:
        check_bearer(request.headers.get("authorization", ""), accepted)


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
