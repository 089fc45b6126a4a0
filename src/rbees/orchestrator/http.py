"""HTTP plumbing shared by the routes: bearer checks, the error envelope, and the SSE response."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from rbees.httpd import invalid_request
from rbees.orchestrator.jobs import LastFrame
from rbees.orchestrator.service import JobService
from rbees.orchestrator.settings import OrchestratorSettings
from rbees.protocol import ErrorCode, RbeesError

log = logging.getLogger("rbees.orchestrator.http")


def service(request: Request) -> JobService:
    """The app's ``JobService`` (also what ``/v1`` routes use)."""
    svc: JobService = request.app.state.service
    return svc


def settings(request: Request) -> OrchestratorSettings:
    value: OrchestratorSettings = request.app.state.settings
    return value


# --- auth -----------------------------------------------------------------------------------------------


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def check_bearer(header: str, accepted: list[str]) -> None:
    """Raise UNAUTHORIZED / FORBIDDEN unless ``header`` (an Authorization value) carries an accepted token."""
    if not accepted:
        return
    given = _bearer(header)
    if given is None:
        raise RbeesError(ErrorCode.UNAUTHORIZED, "this route needs 'Authorization: Bearer <token>'")
    ok = False
    for token in accepted:
        ok |= hmac.compare_digest(given.encode(), token.encode())
    if not ok:
        raise RbeesError(ErrorCode.FORBIDDEN, "the bearer token is not valid here")


def _check(request: Request, accepted: list[str]) -> None:
    if accepted:
        check_bearer(request.headers.get("authorization", ""), accepted)


def require_client(request: Request) -> None:
    """Job and listing routes: the API token, when one is configured."""
    s = settings(request)
    _check(request, [s.api_token] if s.api_token else [])


def require_operator(request: Request) -> None:
    """Worker management: the API token or the registration token."""
    s = settings(request)
    _check(request, [t for t in (s.api_token, s.registration_token) if t])


def require_registration(request: Request) -> None:
    """The ready callback: the registration token; without one, the API token; without both, open."""
    s = settings(request)
    token = s.registration_token or s.api_token
    _check(request, [token] if token else [])


# --- errors ---------------------------------------------------------------------------------------------

Model = TypeVar("Model", bound=BaseModel)


def parse_body(model: type[Model], body: bytes) -> Model:
    """Validate a JSON body straight from bytes; failures are INVALID_REQUEST (400) like FastAPI's."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False, include_context=False)) from None


# --- server-sent events ------------------------------------------------------------------------------

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStreamResponse(Response):
    """Streams SSE frames and notices a client that goes away even while no frame is due.

    ``on_disconnect`` runs when the client drops before the stream ended (a streaming submission
    cancels its job there).
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
