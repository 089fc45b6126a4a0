"""The worker's HTTP surface: ``/execute``, ``/cancel``, ``/health``, and the error envelope.

Handlers stay thin: they check the token, parse the body into a protocol model and call the
``WorkerRuntime``. Every failure leaves as ``{"error": {...}}``; bad input is a 400, never a 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from rbees.httpd import install_error_handlers, invalid_request
from rbees.protocol import CancelRequest, ErrorCode, ExecuteRequest, RbeesError
from rbees.worker.auth import check_bearer
from rbees.worker.engines.base import EngineLoader
from rbees.worker.jobs import Job
from rbees.worker.runtime import WorkerRuntime
from rbees.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# A prompt may hold 1M characters; JSON escaping can make that several times as many bytes.
MAX_BODY_BYTES = 16 * 1024 * 1024

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class JobStreamResponse(StreamingResponse):
    """An SSE response that cancels its job if it ends early (client gone, server stopping)."""

    def __init__(self, job: Job, frames: AsyncIterator[bytes]) -> None:
        super().__init__(frames, media_type="text/event-stream", headers=SSE_HEADERS)
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()


def create_app(
    settings: WorkerSettings, engine_loader: EngineLoader, *, device: str, model_name: str
) -> FastAPI:
    """The worker app; the model starts loading (in a thread) when the app starts up."""
    runtime = WorkerRuntime(settings, engine_loader, device=device, model_name=model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start_loading()
        yield
        runtime.close()

    app = FastAPI(title="rbees-workerd", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        return _json(runtime.health())

    @app.post("/execute")
    async def execute(request: Request) -> Response:
        check_bearer(settings.token, request.headers.get("authorization"))
        body = await _parse_body(request, ExecuteRequest)
        job, frames = await runtime.start_job(body)
        return JobStreamResponse(job, frames)

    @app.post("/cancel", status_code=202)
    async def cancel(request: Request) -> Response:
        check_bearer(settings.token, request.headers.get("authorization"))
        body = await _parse_body(request, CancelRequest)
        running = runtime.cancel(body.job_id)
        return JSONResponse({"job_id": body.job_id, "cancelled": running}, status_code=202)

    return app


def _json(model: BaseModel, status_code: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


async def _read_body(request: Request) -> bytes:
    """The request body, refused as soon as it grows past ``MAX_BODY_BYTES``."""
    too_big = RbeesError(
        ErrorCode.INVALID_REQUEST,
        f"the request body is larger than {MAX_BODY_BYTES} bytes",
        details={"max_body_bytes": MAX_BODY_BYTES},
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_body(request: Request, model: type[M]) -> M:
    """Parse a JSON body whatever its Content-Type (curl -d sends form-encoded by default)."""
    raw = await _read_body(request)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RbeesError(ErrorCode.INVALID_REQUEST, f"the body is not valid JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(
            exc.errors(include_url=False, include_context=False, include_input=False)
        ) from exc
