"""The one error envelope of rbees, its codes and their HTTP statuses.

Every HTTP error any rbees daemon returns is
``{"error": {"code", "message", "details"?, "retriable", "correlation_id"?}}``.

Exception tree::

    RbeesError            carries an ErrorCode, a message, details and retriable
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorCode(StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    WORKER_NOT_FOUND = "WORKER_NOT_FOUND"
    NOT_FOUND = "NOT_FOUND"
    CONFLICT = "CONFLICT"
    CONTEXT_LENGTH_EXCEEDED = "CONTEXT_LENGTH_EXCEEDED"
    QUEUE_FULL = "QUEUE_FULL"
    ALL_SLOTS_BUSY = "ALL_SLOTS_BUSY"
    MODEL_LOADING = "MODEL_LOADING"
    NO_WORKER_AVAILABLE = "NO_WORKER_AVAILABLE"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    WORKER_FAILED = "WORKER_FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


ERROR_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.JOB_NOT_FOUND: 404,
    ErrorCode.WORKER_NOT_FOUND: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.ALL_SLOTS_BUSY: 503,
    ErrorCode.MODEL_LOADING: 503,
    ErrorCode.NO_WORKER_AVAILABLE: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.WORKER_FAILED: 502,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.CANCELLED: 409,
    ErrorCode.INTERNAL: 500,
}

_RETRIABLE = {
    ErrorCode.QUEUE_FULL,
    ErrorCode.ALL_SLOTS_BUSY,
    ErrorCode.MODEL_LOADING,
    ErrorCode.NO_WORKER_AVAILABLE,
    ErrorCode.SHUTTING_DOWN,
    ErrorCode.WORKER_FAILED,
    ErrorCode.TIMEOUT,
}


class ErrorBody(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    message: str
    details: dict[str, Any] | None = None
    retriable: bool = False
    correlation_id: str | None = None


class ErrorEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True)

    error: ErrorBody


class RbeesError(Exception):
    """An error that maps onto the envelope; raise it anywhere a request can fail."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retriable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.retriable = code in _RETRIABLE if retriable is None else retriable
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return ERROR_STATUS.get(self.code, 500)

    def envelope(self, correlation_id: str | None = None) -> ErrorEnvelope:
        return ErrorEnvelope(
            error=ErrorBody(
                code=self.code,
                message=self.message,
                details=self.details,
                retriable=self.retriable,
                correlation_id=correlation_id,
            )
        )

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}
