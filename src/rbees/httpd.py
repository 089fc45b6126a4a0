"""HTTP server pieces every rbees daemon shares: the error envelope as responses, its handlers, the
server-sent events response, and the helpers of the bare-ASGI hot paths.

The worker, the orchestrator and the pool-manager daemon all answer errors the same way, so
they install the same handlers from here rather than each keeping a copy. The worker's
``POST /execute`` and the orchestrator's ``POST /v2/tasks`` are answered before the framework's
middleware and router (``header_map``, ``read_body``, ``error_response``), and both stream with
``EventStreamResponse``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from rbees.protocol import ErrorCode, RbeesError

log = logging.getLogger("rbees.httpd")

CORRELATION_HEADER = "x-correlation-id"
# A prompt may hold 1M characters; JSON escaping can make that several times as many bytes.
MAX_BODY_BYTES = 16 * 1024 * 1024

_HTTP_CODES = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN, 404: ErrorCode.NOT_FOUND}


def invalid_request(raw_errors: Sequence[Any]) -> RbeesError:
    """A 400 INVALID_REQUEST naming each field pydantic rejected (the first five in the message)."""
    problems = [
        {
            "loc": [str(p) for p in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in raw_errors
    ]
    summary = "; ".join(
        f"{'.'.join(p for p in prob['loc'] if p != 'body') or 'body'}: {prob['msg']}" for prob in problems[:5]
    )
    return RbeesError(
        ErrorCode.INVALID_REQUEST, f"invalid request: {summary or 'malformed'}", details={"errors": problems}
    )


def error_response(
    exc: RbeesError, request: Request | None = None, correlation_id: str | None = None
) -> JSONResponse:
    """The envelope as a response, with Retry-After, WWW-Authenticate and the caller's correlation id
    (from ``request``, or given as ``correlation_id`` on a bare-ASGI path)."""
    if request is not None:
        correlation_id = request.headers.get(CORRELATION_HEADER)
    headers = exc.headers()
    if exc.code is ErrorCode.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    body = exc.envelope(correlation_id).model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise leaves as the envelope; nothing unexpected leaks a traceback."""

    @app.exception_handler(RbeesError)
    async def on_rbees(request: Request, exc: RbeesError) -> Response:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(invalid_request(exc.errors()), request)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_REQUEST)
        response = error_response(RbeesError(code, str(exc.detail)), request)
        response.status_code = exc.status_code
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(
            RbeesError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}"), request
        )


# --- bare-ASGI hot paths ---------------------------------------------------------------------------


Headers = dict[bytes, bytes]


async def serve_asgi(
    where: str, scope: Scope, receive: Receive, send: Send, respond: Callable[[Headers], Awaitable[Response]]
) -> None:
    """Answer one request with ``await respond(headers)``; any error it raises leaves as the envelope,
    exactly as the app's exception handlers would answer it."""
    headers = header_map(scope)
    response: Response
    try:
        response = await respond(headers)
    except RbeesError as exc:
        response = error_response(exc, correlation_id=correlation_id(headers))
    except Exception as exc:
        log.error("unhandled error on %s", where, exc_info=True)
        internal = RbeesError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
        response = error_response(internal, correlation_id=correlation_id(headers))
    await response(scope, receive, send)


def header_map(scope: Scope) -> dict[bytes, bytes]:
    """Request headers by lower-case name; the first of repeated headers, as Starlette's ``get``."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name, value)
    return headers


def correlation_id(headers: dict[bytes, bytes]) -> str | None:
    raw = headers.get(CORRELATION_HEADER.encode())
    return raw.decode("latin-1") if raw is not None else None


async def read_body(receive: Receive, limit: int | None = None) -> bytes:
    """The whole request body; past ``limit`` bytes it is refused (400) as soon as it grows too big."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise RbeesError(
                ErrorCode.INVALID_REQUEST,
                f"the request body is larger than {limit} bytes",
                details={"max_body_bytes": limit},
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# --- server-sent events ------------------------------------------------------------------------------

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def accepts_event_stream(accept: str) -> bool:
    """Whether an ``Accept`` header asks for ``text/event-stream`` (named, in any case, with a
    non-zero ``q``; ``*/*`` and ``text/*`` do not count: a stream has to be asked for)."""
    for media_range in accept.split(","):
        kind, *params = (part.strip() for part in media_range.split(";"))
        if kind.lower() != "text/event-stream":
            continue
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    if float(value) <= 0:
                        break
                except ValueError:
                    break
        else:
            return True
    return False


class LastFrame(bytes):
    """The final piece of an event stream: the response can end in the same write."""


class EventStreamResponse(Response):
    """Streams SSE frames and notices a client that goes away even while no frame is due.

    ``on_disconnect`` runs when the client drops before the stream ended (a streaming submission
    cancels its job there). A frame given as ``LastFrame`` ends the response in the same write.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        on_disconnect: Callable[[], None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # Like StreamingResponse: no body, so no Content-Length header.
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})
        self._frames = frames
        self._on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The frames are written from this task; only the disconnect watch runs beside it, and it
        # cancels this task when the client goes away (no second task, no asyncio.wait per stream).
        me = asyncio.current_task()
        assert me is not None
        state = {"gone": False, "over": False}

        def watched(task: asyncio.Task[None]) -> None:
            if state["over"] or task.cancelled() or task.exception() is not None:
                return
            state["gone"] = True
            me.cancel()

        watcher = asyncio.create_task(_wait_disconnect(receive))
        watcher.add_done_callback(watched)
        gone = False
        try:
            await self._stream(send)
        except asyncio.CancelledError:
            if not state["gone"] or me.uncancel() > 0:
                raise  # cancelled from outside (shutdown): not a client that left
            gone = True
        except OSError:
            gone = True
        except Exception:
            log.error("event stream failed", exc_info=True)
            gone = True
        finally:
            state["over"] = True
            watcher.cancel()
        if gone and self._on_disconnect is not None:
            self._on_disconnect()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await self._send_frames(send)

    async def _send_frames(self, send: Send) -> None:
        async for frame in self._frames:
            if isinstance(frame, LastFrame):  # end the response in the same write
                await send({"type": "http.response.body", "body": frame, "more_body": False})
                return
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# --- writing to the connection without the ASGI send path ------------------------------------------


def chunk(frame: bytes) -> bytes:
    """``frame`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


class Transport(Protocol):
    """What is used of the connection's transport (asyncio's, or uvloop's, which is no subclass)."""

    def write(self, data: bytes) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def is_closing(self) -> bool: ...
    def get_extra_info(self, name: str) -> Any: ...


def raw_transport(send: Callable[..., Any]) -> Transport | None:
    """The connection's transport when ``send`` is uvicorn's and its response is chunked, else None.

    uvicorn keeps the transport and the response's framing on the object whose bound method
    ``send`` is; another server, or a response that is not chunked, gets no direct writes.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if getattr(cycle, "chunked_encoding", None) is not True:
        return None
    if not all(callable(getattr(transport, name, None)) for name in _TRANSPORT_METHODS):
        return None
    return cast(Transport, transport)


_TRANSPORT_METHODS = ("write", "get_write_buffer_size", "is_closing", "get_extra_info")
