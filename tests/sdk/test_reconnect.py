"""A stream whose connection drops before the job's end resumes by itself from the last event id.

A real orchestrator never drops a healthy connection on cue, so a small aiohttp server plays one here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from rbees.protocol import EndEvent, QueuedEvent, StartedEvent, TokenEvent
from rbees.sdk import AsyncClient, Client, RbeesConnectionError

JOB = "job-flaky"
EVENTS = [
    '{"type":"queued","job_id":"job-flaky","queue_position":0}',
    '{"type":"started","job_id":"job-flaky","model":"m","started_at":"2025-01-01T00:00:00Z","seed":1}',
    '{"type":"token","t":"Hel","i":0}',
    '{"type":"token","t":"lo","i":1}',
    '{"type":"end","tokens_out":2,"decode_time_ms":5,"stop_reason":"EOS"}',
]


def frames(start: int, stop: int) -> bytes:
    return b"".join(f"id: {i + 1}\ndata: {EVENTS[i]}\n\n".encode() for i in range(start, stop))


async def serve_sse(request: web.Request, payload: bytes) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Job-Id": JOB})
    await resp.prepare(request)
    await resp.write(payload)
    return resp  # ends the response: the connection closes before the job's end event


class FlakyServer:
    """Serves the first three events on submit, the rest on resume; runs on its own loop thread."""

    def __init__(self) -> None:
        self.resumed_from: list[str | None] = []
        self.always_drop = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _submit(self, request: web.Request) -> web.StreamResponse:
        return await serve_sse(request, frames(0, 3))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        last = request.headers.get("Last-Event-ID")
        self.resumed_from.append(last)
        if self.always_drop:
            return await serve_sse(request, b"")
        return await serve_sse(request, frames(int(last or 0), len(EVENTS)))

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_post("/v2/tasks", self._submit)
        app.router.add_get(f"/v2/tasks/{JOB}/events", self._events)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def __enter__(self) -> FlakyServer:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


@pytest.fixture
def flaky() -> Iterator[FlakyServer]:
    with FlakyServer() as server:
        yield server


async def test_async_stream_resumes_after_a_dropped_connection(flaky: FlakyServer) -> None:
    async with AsyncClient(flaky.url) as client:
        stream = client.stream({"model": "m", "prompt": "hi"})
        events = [e async for e in stream]
    assert [type(e) for e in events] == [QueuedEvent, StartedEvent, TokenEvent, TokenEvent, EndEvent]
    assert flaky.resumed_from == ["3"] and stream.last_event_id == "5" and stream.job_id == JOB


async def test_gives_up_after_max_reconnects(flaky: FlakyServer) -> None:
    flaky.always_drop = True
    async with AsyncClient(flaky.url, max_reconnects=2) as client:
        seen = []
        with pytest.raises(RbeesConnectionError):
            async for event in client.stream({"model": "m", "prompt": "hi"}):
                seen.append(event)
    assert len(seen) == 3 and flaky.resumed_from == ["3", "3"]


def test_sync_stream_resumes_too(flaky: FlakyServer) -> None:
    with Client(flaky.url) as client:
        text = "".join(
            e.t for e in client.stream({"model": "m", "prompt": "hi"}) if isinstance(e, TokenEvent)
        )
    assert text == "Hello" and flaky.resumed_from == ["3"]
