"""What the SDK raises.

Every HTTP error envelope ``{"error": {"code", "message", "retriable", ...}}`` becomes the typed
exception of its code; failures below HTTP (refused connection, timeout, a stream that breaks
and cannot be resumed) have their own branch.

Exception tree::

    RbeesSDKError                 base of everything the SDK raises
    ├── RbeesConnectionError      the server could not be reached or the connection broke
    │   └── RbeesTimeoutError     no answer in time
    ├── RbeesProtocolError        the server answered something the SDK cannot read
    └── RbeesAPIError             an error envelope: .code .message .retriable .status .details
        ├── InvalidRequestError       INVALID_REQUEST, CONTEXT_LENGTH_EXCEEDED (400)
        ├── AuthenticationError       UNAUTHORIZED (401)
        ├── PermissionDeniedError     FORBIDDEN (403)
        ├── NotFoundError             NOT_FOUND, WORKER_NOT_FOUND (404)
        │   ├── ModelNotFoundError    MODEL_NOT_FOUND
        │   └── JobNotFoundError      JOB_NOT_FOUND
        ├── ConflictError             CONFLICT, CANCELLED (409)
        ├── QueueFullError            QUEUE_FULL (429, .retry_after)
        ├── ServiceUnavailableError   ALL_SLOTS_BUSY, NO_WORKER_AVAILABLE, MODEL_LOADING, SHUTTING_DOWN (503)
        ├── JobFailedError            WORKER_FAILED, TIMEOUT (a job that could not finish)
        └── InternalServerError       INTERNAL, and any 5xx without an envelope
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rbees.protocol import ErrorCode, ErrorEvent


class RbeesSDKError(Exception):
    """Base of every exception the rbees SDK raises."""


class RbeesConnectionError(RbeesSDKError):
    """The server could not be reached, or the connection broke and could not be resumed."""


class RbeesTimeoutError(RbeesConnectionError):
    """The server did not answer in time."""


class RbeesProtocolError(RbeesSDKError):
    """The server answered with something that is not rbees' wire format."""


class RbeesAPIError(RbeesSDKError):
    """An error envelope from an rbees daemon (or an ``error`` event of a job)."""

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        status: int | None = None,
        retriable: bool = False,
        details: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retriable = retriable
        self.details = dict(details) if details else None
        self.correlation_id = correlation_id
        self.retry_after = retry_after


class InvalidRequestError(RbeesAPIError):
    """The request was refused as malformed or too large for the model."""


class AuthenticationError(RbeesAPIError):
    """No token, or a wrong one."""


class PermissionDeniedError(RbeesAPIError):
    """The token is valid but may not do this."""


class NotFoundError(RbeesAPIError):
    """The thing asked for does not exist."""


class ModelNotFoundError(NotFoundError):
    """No worker anywhere serves this model."""


class JobNotFoundError(NotFoundError):
    """No job has this id (or it has been forgotten)."""


class ConflictError(RbeesAPIError):
    """The request conflicts with the state of the thing it acts on."""


class QueueFullError(RbeesAPIError):
    """The orchestrator's queue is full; retry after ``retry_after`` seconds."""


class ServiceUnavailableError(RbeesAPIError):
    """No capacity right now (all slots busy, no worker, a model still loading, shutting down)."""


class JobFailedError(RbeesAPIError):
    """A job could not finish: its worker failed or it ran out of time."""


class InternalServerError(RbeesAPIError):
    """The server failed."""


_BY_CODE: dict[str, type[RbeesAPIError]] = {
    ErrorCode.INVALID_REQUEST: InvalidRequestError,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: InvalidRequestError,
    ErrorCode.UNAUTHORIZED: AuthenticationError,
    ErrorCode.FORBIDDEN: PermissionDeniedError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.WORKER_NOT_FOUND: NotFoundError,
    ErrorCode.MODEL_NOT_FOUND: ModelNotFoundError,
    ErrorCode.JOB_NOT_FOUND: JobNotFoundError,
    ErrorCode.CONFLICT: ConflictError,
    ErrorCode.CANCELLED: ConflictError,
    ErrorCode.QUEUE_FULL: QueueFullError,
    ErrorCode.ALL_SLOTS_BUSY: ServiceUnavailableError,
    ErrorCode.NO_WORKER_AVAILABLE: ServiceUnavailableError,
    ErrorCode.MODEL_LOADING: ServiceUnavailableError,
    ErrorCode.SHUTTING_DOWN: ServiceUnavailableError,
    ErrorCode.WORKER_FAILED: JobFailedError,
    ErrorCode.TIMEOUT: JobFailedError,
    ErrorCode.INTERNAL: InternalServerError,
}

_BY_STATUS: dict[int, type[RbeesAPIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: InvalidRequestError,
    429: QueueFullError,
    503: ServiceUnavailableError,
}

_CODE_FOR_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    409: ErrorCode.CONFLICT,
    422: ErrorCode.INVALID_REQUEST,
    429: ErrorCode.QUEUE_FULL,
    503: ErrorCode.NO_WORKER_AVAILABLE,
}


def _exception_class(code: str, status: int | None) -> type[RbeesAPIError]:
    if code in _BY_CODE:
        return _BY_CODE[code]
    if status is not None and status in _BY_STATUS:
        return _BY_STATUS[status]
    if status is not None and status >= 500:
        return InternalServerError
    return RbeesAPIError


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _without_envelope(status: int, body: bytes) -> tuple[str, str, dict[str, Any] | None]:
    code = _CODE_FOR_STATUS.get(status, ErrorCode.INTERNAL if status >= 500 else ErrorCode.INVALID_REQUEST)
    text = body.decode("utf-8", errors="replace").strip()
    return code, text[:500] or f"HTTP {status}", None


def error_from_response(status: int, body: bytes, headers: Mapping[str, str]) -> RbeesAPIError:
    """The typed exception for an HTTP error answer, envelope or not."""
    try:
        doc: Any = json.loads(body) if body else None
    except ValueError:
        doc = None
    inner = doc.get("error") if isinstance(doc, dict) else None
    retriable = status in (429, 503)
    correlation_id: str | None = None
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        code = str(inner.get("code") or _CODE_FOR_STATUS.get(status, ErrorCode.INTERNAL))
        message: str = inner["message"]
        details = inner.get("details") if isinstance(inner.get("details"), dict) else None
        retriable = bool(inner.get("retriable", retriable))
        cid = inner.get("correlation_id")
        correlation_id = cid if isinstance(cid, str) else None
    elif isinstance(doc, dict) and "detail" in doc:
        # A framework-level answer (e.g. FastAPI's own 422) rather than rbees' envelope.
        code, message, _ = _without_envelope(status, b"")
        message = json.dumps(doc["detail"])[:500]
        details = {"detail": doc["detail"]}
    else:
        code, message, details = _without_envelope(status, body)
    cls = _exception_class(code, status)
    return cls(
        code,
        message,
        status=status,
        retriable=retriable,
        details=details,
        correlation_id=correlation_id,
        retry_after=_retry_after(headers),
    )


def error_from_event(event: ErrorEvent) -> RbeesAPIError:
    """The typed exception for a job's terminal ``error`` event."""
    cls = _exception_class(event.code, None)
    return cls(event.code, event.message, retriable=event.retriable)
