"""``/v2/workers``: the ready callback registers a worker; operators list and remove them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from rbees.orchestrator.fleet import WorkerInfo
from rbees.orchestrator.http import (
    limited_body,
    parse_body,
    require_client,
    require_operator,
    require_registration,
    service,
)
from rbees.protocol import WorkerRegistration

router = APIRouter()

REGISTRATION_MAX_BYTES = 64 * 1024  # a registration is well under 2 KiB


@router.post(
    "/v2/workers/register",
    dependencies=[Depends(require_registration)],
    response_model=WorkerInfo,
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": WorkerRegistration.model_json_schema()}}}
    },
)
async def register_worker(request: Request) -> WorkerInfo:
    # The body is read as JSON whatever its content type (``curl -d`` sends a form type), as on
    # /v2/tasks and the workers' own endpoints.
    registration = parse_body(WorkerRegistration, await limited_body(request, REGISTRATION_MAX_BYTES))
    return service(request).register_worker(registration)


@router.get("/v2/workers", dependencies=[Depends(require_operator)])
async def list_workers(request: Request) -> dict[str, Any]:
    return {"workers": [w.model_dump(mode="json") for w in service(request).workers()]}


@router.delete("/v2/workers/{worker_id}", dependencies=[Depends(require_operator)])
async def deregister_worker(worker_id: str, request: Request) -> dict[str, Any]:
    service(request).deregister_worker(worker_id)
    return {"worker_id": worker_id, "deregistered": True}


@router.get("/v2/models", dependencies=[Depends(require_client)])
async def list_models(request: Request) -> dict[str, Any]:
    return {
        "models": [
            {
                "model": m.model,
                "workers": m.workers,
                "schedulable_workers": m.schedulable_workers,
                "slots_total": m.slots_total,
            }
            for m in service(request).models()
        ]
    }
