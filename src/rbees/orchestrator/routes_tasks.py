"""``/v2/tasks``: submit, inspect, follow and cancel jobs. Thin: everything happens in ``JobService``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from rbees.orchestrator.http import EventStreamResponse, parse_body, require_client, service
from rbees.orchestrator.jobs import TaskInfo
from rbees.protocol import ErrorCode, RbeesError, TaskAccepted, TaskRequest

router = APIRouter(prefix="/v2/tasks", dependencies=[Depends(require_client)])
# The submission route is the hot path: it checks the token and parses the body itself (one pass from
# JSON bytes to the model) instead of going through FastAPI's dependency and body machinery.
submit_router = APIRouter(prefix="/v2/tasks")


def wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


@submit_router.post(
    "",
    status_code=202,
    response_model=TaskAccepted,
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": TaskRequest.model_json_schema()}}}
    },
)
async def submit_task(request: Request) -> Response:
    require_client(request)
    task = parse_body(TaskRequest, await request.body())
    svc = service(request)
    job = svc.submit(task)
    if wants_stream(request):

        def client_gone() -> None:
            svc.cancel(job.id)

        return EventStreamResponse(
            job.log.follow_frames(), on_disconnect=client_gone, headers={"X-Job-Id": job.id}
        )
    accepted = TaskAccepted(
        job_id=job.id,
        status=job.state.value,
        queue_position=job.accepted_position,
        events_url=svc.events_url(job.id),
    )
    return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": f"/v2/tasks/{job.id}"})


@router.get("")
async def list_tasks(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    status: str | None = None,
) -> dict[str, Any]:
    return {"tasks": [t.model_dump(mode="json") for t in service(request).list_tasks(limit, status)]}


@router.get("/{job_id}", response_model=TaskInfo)
async def get_task(job_id: str, request: Request) -> TaskInfo:
    return service(request).info(job_id)


@router.get("/{job_id}/events")
async def task_events(
    job_id: str,
    request: Request,
    last_event_id: Annotated[str | None, Header()] = None,
    last: Annotated[int | None, Query(alias="last_event_id", ge=0)] = None,
) -> Response:
    log = service(request).event_log(job_id)
    return EventStreamResponse(log.follow_frames(_last_id(last_event_id, last)), headers={"X-Job-Id": job_id})


@router.post("/{job_id}/cancel", status_code=202, response_model=TaskInfo)
async def cancel_task(job_id: str, request: Request) -> TaskInfo:
    return service(request).cancel(job_id)


def _last_id(header: str | None, query: int | None) -> int:
    if header is None or not header.strip():
        return query or 0
    try:
        value = int(header.strip())
    except ValueError:
        raise RbeesError(
            ErrorCode.INVALID_REQUEST, "Last-Event-ID must be an event id (an integer)"
        ) from None
    if value < 0:
        raise RbeesError(ErrorCode.INVALID_REQUEST, "Last-Event-ID must not be negative")
    return value
