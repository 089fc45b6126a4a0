"""The worker's HTTP surface: ``/execute``, ``/channel``, ``/cancel``, ``/health``, and the error envelope.

Handlers stay thin: they check the token, parse the body into a protocol model and call the
``WorkerRuntime``. Every failure leaves as ``{"error": {...}}``; bad input is a 400, never a 500.
``POST /execute`` is the hot path: ``WorkerApp`` answers it before FastAPI's middleware and router
(the route below serves the same code for anything that mounts the routes without the fast path).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from rbees.httpd import (
    MAX_BODY_BYTES,
    EventStreamResponse,
    Headers,
    install_error_handlers,
    invalid_request,
    read_body,
    serve_asgi,
)
from rbees.protocol import CancelRequest, ErrorCode, ExecuteRequest, RbeesError
from rbees.worker.auth import check_bearer
from rbees.worker.channel import CHANNEL_HEADER, CHANNEL_MEDIA_TYPE
from rbees.worker.direct import FrameSink
from rbees.worker.engines.base import EngineLoader
from rbees.worker.jobs import Job
from rbees.worker.runtime import JobStream, WorkerRuntime
from rbees.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class WorkerApp(FastAPI):
    """FastAPI, with ``POST /execute`` answered before the middleware stack and router."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            # The streaming answers need uvicorn's own ``send`` (whose transport the decode thread
            # writes to), not one wrapped by the middleware.
            handler = _FAST_PATHS.get(scope["path"])
            runtime: WorkerRuntime | None = getattr(self.state, "runtime", None)
            if handler is not None and runtime is not None:
                scope["app"] = self
                await handler(runtime, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def execute_asgi(runtime: WorkerRuntime, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /execute`` as a bare ASGI handler: the same checks, parsing and answers as the route."""

    async def respond(headers: Headers) -> Response:
        auth = headers.get(b"authorization")
        check_bearer(runtime.settings.token, auth.decode("latin-1") if auth is not None else None)
        _check_declared_size(headers.get(b"content-length", b"").decode("latin-1"))
        channel = headers.get(CHANNEL_HEADER.encode())
        with runtime.admitting():
            request = _parse(await read_body(receive, MAX_BODY_BYTES), ExecuteRequest)
            return await _start(runtime, request, channel.decode("latin-1") if channel is not None else None)

    await serve_asgi("POST /execute", scope, receive, send, respond)


async def channel_asgi(runtime: WorkerRuntime, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /channel`` as a bare ASGI handler, as the route below."""

    async def respond(headers: Headers) -> Response:
        auth = headers.get(b"authorization")
        check_bearer(runtime.settings.token, auth.decode("latin-1") if auth is not None else None)
        return channel_response(runtime)

    await serve_asgi("POST /channel", scope, receive, send, respond)


_FAST_PATHS = {"/execute": execute_asgi, "/channel": channel_asgi}


class DirectWriteResponse(EventStreamResponse):
    """Headers and a first frame, then the decode thread may write to the socket itself (``sink``);
    what it leaves to the loop comes through ``frames``. ``on_end`` runs however the answer ends."""

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        first: bytes,
        sink: FrameSink,
        on_end: Callable[[], None],
        on_disconnect: Callable[[], None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(frames, on_disconnect=on_disconnect, headers=headers)
        self.first = first
        self.sink = sink
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.first, "more_body": True})
        self.sink.start(send)  # from here on the decode thread may write the frames itself
        await self._send_frames(send)


def channel_response(runtime: WorkerRuntime) -> DirectWriteResponse:
    """``POST /channel``: the channel's first line, then its jobs' lines until the client goes away
    (which cancels them) or the worker stops."""
    runtime.ready_engine()
    channel = runtime.channels.open(asyncio.get_running_loop())
    return DirectWriteResponse(
        channel.frames(),
        channel.first,
        channel.sink,
        on_end=lambda: runtime.channels.close(channel),
        headers={"Content-Type": CHANNEL_MEDIA_TYPE},
    )


def job_stream_response(job: Job, stream: JobStream) -> DirectWriteResponse:
    """A job's events: the ``started`` frame, then its tokens; a stream that ends early (client gone,
    server stopping) cancels the job (a no-op for a job that already ended)."""
    return DirectWriteResponse(
        stream.frames(), stream.first, stream.sink, on_end=job.cancel.set, on_disconnect=job.cancel.set
    )


async def _start(runtime: WorkerRuntime, request: ExecuteRequest, channel_id: str | None) -> Response:
    if channel_id is not None:
        channel = runtime.channels.get(channel_id)
        await runtime.start_on_channel(request, channel)
        return JSONResponse({"job_id": request.job_id, "channel_id": channel.id}, status_code=202)
    job, stream = await runtime.start_job(request)
    return job_stream_response(job, stream)


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

    app = WorkerApp(title="rbees-workerd", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        return _json(runtime.health())

    @app.post("/execute")
    async def execute(request: Request) -> Response:
        check_bearer(settings.token, request.headers.get("authorization"))
        _check_declared_size(request.headers.get("content-length", ""))
        with runtime.admitting():
            body = _parse(await _read_request(request), ExecuteRequest)
            return await _start(runtime, body, request.headers.get(CHANNEL_HEADER))

    @app.post("/channel")
    async def channel(request: Request) -> Response:
        check_bearer(settings.token, request.headers.get("authorization"))
        return channel_response(runtime)

    @app.post("/cancel", status_code=202)
    async def cancel(request: Request) -> Response:
        check_bearer(settings.token, request.headers.get("authorization"))
        _check_declared_size(request.headers.get("content-length", ""))
        body = _parse(await _read_request(request), CancelRequest)
        running = runtime.cancel(body.job_id)
        return JSONResponse({"job_id": body.job_id, "cancelled": running}, status_code=202)

    return app


def _json(model: BaseModel, status_code: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def _too_big() -> RbeesError:
    return RbeesError(
        ErrorCode.INVALID_REQUEST,
        f"the request body is larger than {MAX_BODY_BYTES} bytes",
        details={"max_body_bytes": MAX_BODY_BYTES},
    )


def _check_declared_size(content_length: str) -> None:
    """Refuse a body whose declared size is too big before reading any of it."""
    if content_length.isdigit() and int(content_length) > MAX_BODY_BYTES:
        raise _too_big()


async def _read_request(request: Request) -> bytes:
    """The request body, refused as soon as it grows past ``MAX_BODY_BYTES``."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_big()
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes, model: type[M]) -> M:
    """Parse a JSON body whatever its Content-Type (curl -d sends form-encoded by default)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError: not JSON, not UTF-8, or an integer past Python's 4300 digits; RecursionError:
        # nested deeper than the parser follows.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RbeesError(ErrorCode.INVALID_REQUEST, f"the body is not valid JSON: {reason}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(
            exc.errors(include_url=False, include_context=False, include_input=False)
        ) from exc
