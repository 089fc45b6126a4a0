"""Health reports and the worker's ready callback (which is also the registration body)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from rbees.protocol.requests import Backend


class WorkerStatus(StrEnum):
    LOADING = "loading"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


class WorkerHealth(BaseModel):
    """``GET /health`` on a worker."""

    model_config = ConfigDict(frozen=True)

    status: WorkerStatus
    worker_id: str
    model: str
    backend: Backend
    device: str
    vram_bytes: int = 0
    slots_total: int
    slots_busy: int
    uptime_s: float
    context_length: int | None = None
    error: str | None = None


class WorkerRegistration(BaseModel):
    """The ready callback a worker POSTs once loaded; the orchestrator registers exactly this.

    ``token`` is the worker's own bearer token, so whoever receives it can call the worker.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    worker_id: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")]
    uri: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=512)]
    model_ref: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    backend: Backend
    device: str
    gpu: int | None = None
    vram_bytes: int = Field(default=0, ge=0)
    slots_total: int = Field(ge=1, le=1024)
    pool: str | None = None
    token: str | None = None


class OrchestratorHealth(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: str
    pools: int
    workers: int
    queue_depth: int
