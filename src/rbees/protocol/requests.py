"""Request bodies: the worker's ``/execute`` and the orchestrator's ``/v2/tasks``."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

MAX_TOKENS_LIMIT = 32_768
MAX_PROMPT_CHARS = 1_000_000
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1_000
SEED_LIMIT = 2**63 - 1

JobId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")]


class StopReason(StrEnum):
    MAX_TOKENS = "MAX_TOKENS"
    EOS = "EOS"
    STOP_SEQUENCE = "STOP_SEQUENCE"
    CANCELLED = "CANCELLED"
    ERROR = "ERROR"


class Priority(StrEnum):
    INTERACTIVE = "interactive"
    BATCH = "batch"


class Backend(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    METAL = "metal"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]


class SamplingParams(BaseModel):
    """Generation parameters, identical for a worker job and an orchestrator task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT, strict=True)] = 128
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=100_000, strict=True)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    stop: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]],
        Field(max_length=MAX_STOP_SEQUENCES),
    ] = Field(default_factory=list)
    seed: Annotated[int, Field(ge=0, le=SEED_LIMIT, strict=True)] | None = None

    @field_validator("temperature", "top_p", "min_p", "repetition_penalty")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @model_validator(mode="after")
    def _one_input(self) -> SamplingParams:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("'prompt' must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self


class ExecuteRequest(SamplingParams):
    """``POST /execute`` on a worker."""

    job_id: JobId


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: JobId


class Placement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    worker: str | None = None
    pool: str | None = None


class TaskRequest(SamplingParams):
    """``POST /v2/tasks`` on the orchestrator."""

    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    priority: Priority = Priority.INTERACTIVE
    placement: Placement | None = None
    deadline_ms: Annotated[int, Field(ge=1, le=86_400_000, strict=True)] | None = None
    session_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams.model_validate(self.model_dump(include=set(SamplingParams.model_fields)))


class TaskAccepted(BaseModel):
    model_config = ConfigDict(frozen=True)

    job_id: str
    status: str
    queue_position: int
    events_url: str
