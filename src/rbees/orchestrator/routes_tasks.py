"""``/v2/tasks``: submit, inspect, follow and cancel jobs. Thin: everything happens in ``JobService``."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from rbees.httpd import MAX_BODY_BYTES, Headers, accepts_event_stream, read_body, serve_asgi
from rbees.orchestrator.event_stream import JobEventsResponse
from rbees.orchestrator.http import check_bearer, parse_body, require_client, service
from rbees.orchestrator.jobs import JobState, TaskInfo
from rbees.orchestrator.service import JobService
from rbees.orchestrator.settings import OrchestratorSettings
from rbees.protocol import ErrorCode, RbeesError, TaskAccepted, TaskRequest

log = logging.getLogger("rbees.orchestrator.http")

router = APIRouter(prefix="/v2/tasks", dependencies=[Depends(require_client)])
# The submission route is the hot path: it checks the token and parses the body itself (one pass from
# JSON bytes to the model) instead of going through FastAPI's dependency and body machinery.
submit_router = APIRouter(prefix="/v2/tasks")


def wants_stream(request: Request) -> bool:
    return accepts_event_stream(request.headers.get("accept", ""))


@submit_router.post(
    "",
    status_code=202,
    response_model=TaskAccepted,
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": TaskRequest.model_json_schema()}}}
    },
)
async def submit_task(request: Request) -> Response:
    # Served by ``submit_asgi`` below in the running app; this route documents it (OpenAPI) and serves
    # any app that mounts the router without the fast path.
    require_client(request)
    svc = service(request)
    return _submitted(svc, await request.body(), wants_stream(request))


def _submitted(svc: JobService, body: bytes, stream: bool) -> Response:
    try:
        task = parse_body(TaskRequest, body)
    except RbeesError:
        task = _with_the_only_model(svc, body)
    job = svc.submit(task)
    if stream:

        def client_gone() -> None:
            svc.cancel(job.id)

        return JobEventsResponse(job.log, on_disconnect=client_gone, headers={"X-Job-Id": job.id})
    accepted = TaskAccepted(
        job_id=job.id,
        status=job.state.value,
        queue_position=job.accepted_position,
        events_url=svc.events_url(job.id),
    )
    return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": f"/v2/tasks/{job.id}"})


def _with_the_only_model(svc: JobService, body: bytes) -> TaskRequest:
    """A task that names no model runs on the one model this orchestrator serves, when it serves
    exactly one; otherwise (or when anything else is wrong with it) the body's error stands."""
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can follow
        fields = None
    if not isinstance(fields, dict) or "model" in fields:
        return parse_body(TaskRequest, body)  # raises the original error
    served = sorted(svc.fleet.models())
    if len(served) != 1:
        raise RbeesError(
            ErrorCode.INVALID_REQUEST,
            "model is required: this orchestrator serves "
            + (", ".join(repr(m) for m in served) if served else "no model yet"),
            details={"available": served},
        )
    return parse_body(TaskRequest, json.dumps({**fields, "model": served[0]}).encode())


async def submit_asgi(
    svc: JobService, settings: OrchestratorSettings, scope: Scope, receive: Receive, send: Send
) -> None:
    """``POST /v2/tasks`` as a bare ASGI handler: the same checks, body parsing and answers as the
    route, without the framework's middleware, routing and dependency layers on the hot path."""

    async def respond(headers: Headers) -> Response:
        if settings.api_token:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            check_bearer(auth, [settings.api_token], (settings.registration_token,))
        body = await read_body(receive, MAX_BODY_BYTES)
        stream = accepts_event_stream(headers.get(b"accept", b"").decode("latin-1"))
        response = _submitted(svc, body, stream)
        # The request to the worker already went out if a kept-alive connection was idle; if not,
        # let the dispatch task start connecting before this answer is written.
        await asyncio.sleep(0)
        return response

    await serve_asgi("POST /v2/tasks", scope, receive, send, respond)


@router.get("")
async def list_tasks(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    status: JobState | None = None,
) -> dict[str, Any]:
    tasks = service(request).list_tasks(limit, status.value if status else None)
    return {"tasks": [t.model_dump(mode="json") for t in tasks]}


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
    log, start = service(request).event_log(job_id, _last_id(last_event_id, last))
    return JobEventsResponse(log, start, headers={"X-Job-Id": job_id})


@router.post("/{job_id}/cancel", status_code=202, response_model=TaskInfo)
async def cancel_task(job_id: str, request: Request) -> TaskInfo:
    return service(request).cancel(job_id)


def _last_id(header: str | None, query: int | None) -> int:
    if header is None or not header.strip():
        return query or 0
    text = header.strip()
    if text.startswith("-") and text[1:].isdecimal():
        raise RbeesError(ErrorCode.INVALID_REQUEST, "Last-Event-ID must not be negative")
    if not (text.isascii() and text.isdecimal()) or len(text) > 18:
        raise RbeesError(ErrorCode.INVALID_REQUEST, "Last-Event-ID must be an event id (an integer)")
    return int(text)
