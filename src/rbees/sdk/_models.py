"""Read-side answers of the orchestrator that the wire contracts leave open.

They are lenient on purpose: the fields the SDK relies on are typed, anything else the server
adds is kept (``model_extra``) so a newer orchestrator never breaks an older SDK.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class JobInfo(_Lenient):
    """``GET /v2/tasks/{id}`` (and each item of ``GET /v2/tasks``)."""

    job_id: str
    status: str
    model: str | None = None
    priority: str | None = None
    queue_position: int | None = None
    worker_id: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    stop_reason: str | None = None
    error: Any = None
    created_at: Any = None
    started_at: Any = None
    finished_at: Any = None


class WorkerInfo(_Lenient):
    """One entry of ``GET /v2/workers``."""

    worker_id: str
    model: str | None = Field(default=None, validation_alias=AliasChoices("model", "model_ref"))
    uri: str | None = None
    backend: str | None = None
    device: str | None = None
    gpu: int | None = None
    pool: str | None = None
    status: str | None = None
    schedulable: bool | None = None
    slots_total: int | None = None
    slots_busy: int | None = None
    vram_bytes: int | None = None
    last_error: str | None = None

    @property
    def ready(self) -> bool:
        """Healthy and taking jobs."""
        return self.status == "healthy" and self.schedulable is not False


class ModelInfo(_Lenient):
    """One entry of ``GET /v1/models``: a model some healthy worker serves."""

    id: str
    object: str = "model"
    owned_by: str | None = None
    created: int | None = None
    ready_workers: int | None = None  # rbees' own field: how many of its workers take jobs now
