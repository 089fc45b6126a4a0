"""A job's event stream: typed events, the last event id seen, and resuming after a broken connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable

import aiohttp
from pydantic import ValidationError

from rbees.protocol import Event, QueuedEvent, SSEParser, StartedEvent, TaskAccepted, is_terminal, parse_event
from rbees.sdk._errors import RbeesConnectionError, RbeesProtocolError
from rbees.sdk._transport import Transport, is_event_stream

_KNOWN_TYPES = frozenset({"queued", "started", "token", "metrics", "end", "error"})

Opener = Callable[[], Awaitable[aiohttp.ClientResponse]]


class _Dropped(Exception):
    """The connection ended before the job's terminal event."""


def _decode(data: str) -> Event | None:
    """The typed event of one SSE payload; ``None`` for event types this SDK does not know."""
    try:
        return parse_event(data)
    except ValidationError as exc:
        try:
            kind = json.loads(data).get("type")
        except (ValueError, AttributeError):
            kind = None
        if kind not in _KNOWN_TYPES:
            return None
        raise RbeesProtocolError(f"malformed {kind!r} event: {exc}") from exc


class EventStream:
    """Async iterator over one job's events, ending after its terminal ``end`` or ``error`` event.

    ``open_first`` opens the first connection (a streaming submission); without it the stream
    follows ``job_id`` on its events URL. ``job_id`` is known once the first answer arrived;
    ``last_event_id`` is the orchestrator's id of the last event yielded, which
    ``AsyncClient.events(job_id, last_event_id=...)`` resumes after. When the connection breaks
    before the terminal event, the stream resumes by itself up to ``max_reconnects`` times.
    Use it as an async context manager, or call :meth:`aclose`, to drop the connection early
    (dropping a streaming submission cancels its job; dropping a follower does not).
    """

    def __init__(
        self,
        transport: Transport,
        open_first: Opener | None,
        *,
        job_id: str | None = None,
        last_event_id: str | None = None,
        max_reconnects: int = 3,
        resumable: bool = True,
    ) -> None:
        self._transport = transport
        self._open_first = open_first
        self.job_id = job_id
        self.last_event_id = last_event_id
        self.max_reconnects = max_reconnects
        self._resumable = resumable
        self._gen: AsyncGenerator[Event, None] | None = None
        self._resp: aiohttp.ClientResponse | None = None
        self.finished = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._gen is None:
            self._gen = self._run()
        return await self._gen.__anext__()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drop the connection (the job itself goes on; cancel it with ``AsyncClient.cancel``)."""
        gen, self._gen = self._gen, None
        if gen is not None:
            await gen.aclose()
        if self._resp is not None:
            self._resp.close()
            self._resp = None

    async def _resume(self) -> aiohttp.ClientResponse:
        headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id is not None else {}
        return await self._transport.open_stream("GET", f"/v2/tasks/{self.job_id}/events", headers=headers)

    async def _open(self) -> aiohttp.ClientResponse:
        if self._open_first is None:
            return await self._resume()
        resp = await self._open_first()
        if is_event_stream(resp):
            self.job_id = self.job_id or resp.headers.get("X-Job-Id")
            return resp
        # The server accepted the job without streaming it: follow it on its events URL.
        try:
            accepted = TaskAccepted.model_validate_json(await resp.read())
        except ValidationError as exc:
            raise RbeesProtocolError(f"expected an event stream or a task, got {resp.content_type}") from exc
        finally:
            resp.release()
        self.job_id = accepted.job_id
        return await self._resume()

    async def _run(self) -> AsyncGenerator[Event, None]:
        resp = await self._open()
        failures = 0
        while True:
            self._resp = resp
            try:
                async for event in self._read(resp):
                    failures = 0
                    yield event
                    if is_terminal(event):
                        self.finished = True
                        return
                raise _Dropped("the stream ended before the job's end event")
            except (_Dropped, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                failures += 1
                if not self._resumable or self.job_id is None or failures > self.max_reconnects:
                    raise RbeesConnectionError(f"event stream of job {self.job_id} broke: {exc}") from exc
            finally:
                resp.close()
                self._resp = None
            await asyncio.sleep(min(0.25 * 2 ** (failures - 1), 2.0))
            resp = await self._resume()

    async def _read(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[Event, None]:
        parser = SSEParser()
        async for chunk in resp.content.iter_any():
            for msg in parser.feed(chunk):
                if msg.data == "[DONE]":
                    continue
                event = _decode(msg.data)
                if event is None:
                    continue
                if msg.id is not None:
                    self.last_event_id = msg.id
                if isinstance(event, QueuedEvent | StartedEvent) and self.job_id is None:
                    self.job_id = event.job_id
                yield event
