"""HTTP server pieces every rbees daemon shares: the error envelope as responses, and its handlers.

The worker, the orchestrator and the pool-manager daemon all answer errors the same way, so
they install the same handlers from here rather than each keeping a copy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from rbees.protocol import ErrorCode, RbeesError

log = logging.getLogger("rbees.httpd")

CORRELATION_HEADER = "x-correlation-id"

_HTTP_CODES = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN, 404: ErrorCode.NOT_FOUND}


def invalid_request(raw_errors: Sequence[Any]) -> RbeesError:
    """A 400 INVALID_REQUEST naming each field pydantic rejected (the first five in the message)."""
    problems = [
        {
            "loc": [str(p) for p in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in raw_errors
    ]
    summary = "; ".join(
        f"{'.'.join(p for p in prob['loc'] if p != 'body') or 'body'}: {prob['msg']}" for prob in problems[:5]
    )
    return RbeesError(
        ErrorCode.INVALID_REQUEST, f"invalid request: {summary or 'malformed'}", details={"errors": problems}
    )


def error_response(exc: RbeesError, request: Request | None = None) -> JSONResponse:
    """The envelope as a response, with Retry-After, WWW-Authenticate and the caller's correlation id."""
    correlation_id = request.headers.get(CORRELATION_HEADER) if request is not None else None
    headers = exc.headers()
    if exc.code is ErrorCode.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    body = exc.envelope(correlation_id).model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise leaves as the envelope; nothing unexpected leaks a traceback."""

    @app.exception_handler(RbeesError)
    async def on_rbees(request: Request, exc: RbeesError) -> Response:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(invalid_request(exc.errors()), request)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_REQUEST)
        response = error_response(RbeesError(code, str(exc.detail)), request)
        response.status_code = exc.status_code
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(
            RbeesError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}"), request
        )
