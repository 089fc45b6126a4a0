"""Wire contracts shared by every rbees program.

Everything that crosses a process boundary (HTTP bodies, SSE events, the ready callback,
runtime records) is a pydantic model defined here, so the worker, the orchestrator, the pool CLI,
the operator CLI and the SDK can never drift apart.
"""

from rbees.protocol.errors import ERROR_STATUS, ErrorBody, ErrorCode, ErrorEnvelope, RbeesError
from rbees.protocol.events import (
    EndEvent,
    ErrorEvent,
    Event,
    MetricsEvent,
    QueuedEvent,
    StartedEvent,
    TokenEvent,
    is_terminal,
    parse_event,
)
from rbees.protocol.health import (
    BearerToken,
    OrchestratorHealth,
    PoolName,
    WorkerHealth,
    WorkerRegistration,
    WorkerStatus,
    is_http_url,
)
from rbees.protocol.requests import (
    Backend,
    CancelRequest,
    ChatMessage,
    ExecuteRequest,
    Placement,
    Priority,
    SamplingParams,
    StopReason,
    TaskAccepted,
    TaskRequest,
)
from rbees.protocol.sse import SSEMessage, SSEParser, encode_sse

__all__ = [
    "ERROR_STATUS",
    "Backend",
    "BearerToken",
    "CancelRequest",
    "ChatMessage",
    "EndEvent",
    "ErrorBody",
    "ErrorCode",
    "ErrorEnvelope",
    "ErrorEvent",
    "Event",
    "ExecuteRequest",
    "MetricsEvent",
    "OrchestratorHealth",
    "Placement",
    "PoolName",
    "Priority",
    "QueuedEvent",
    "RbeesError",
    "SSEMessage",
    "SSEParser",
    "SamplingParams",
    "StartedEvent",
    "StopReason",
    "TaskAccepted",
    "TaskRequest",
    "TokenEvent",
    "WorkerHealth",
    "WorkerRegistration",
    "WorkerStatus",
    "encode_sse",
    "is_http_url",
    "is_terminal",
    "parse_event",
]
