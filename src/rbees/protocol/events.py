"""Job events, as streamed by workers and relayed (with ``queued`` first) by the orchestrator.

Every job ends with exactly one terminal event: ``end`` or ``error``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from rbees.protocol.errors import ErrorCode
from rbees.protocol.requests import StopReason


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class QueuedEvent(_Event):
    type: Literal["queued"] = "queued"
    job_id: str
    queue_position: int


class StartedEvent(_Event):
    type: Literal["started"] = "started"
    job_id: str
    model: str
    started_at: str
    seed: int | None = None
    tokens_in: int | None = None
    worker_id: str | None = None


class TokenEvent(_Event):
    type: Literal["token"] = "token"
    t: str
    i: int


class MetricsEvent(_Event):
    type: Literal["metrics"] = "metrics"
    tokens_out: int | None = None
    tokens_per_second: float | None = None
    extra: dict[str, Any] | None = None


class EndEvent(_Event):
    type: Literal["end"] = "end"
    tokens_out: int
    tokens_in: int | None = None
    decode_time_ms: int
    stop_reason: StopReason
    stop_sequence_matched: str | None = None


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    retriable: bool = False


Event = Annotated[
    QueuedEvent | StartedEvent | TokenEvent | MetricsEvent | EndEvent | ErrorEvent,
    Field(discriminator="type"),
]

_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(data: str | bytes) -> Event:
    """Parse one SSE ``data:`` payload into its typed event."""
    return _EVENT_ADAPTER.validate_json(data)


def is_terminal(event: BaseModel) -> bool:
    return isinstance(event, EndEvent | ErrorEvent)
