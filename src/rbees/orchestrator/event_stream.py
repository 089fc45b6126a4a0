"""A job's events as an SSE response that writes live events from inside the relay.

Following a job by awaiting its log costs, per event, a future resolved by the worker stream's
callback, a wake-up of the response's task in a later turn of the loop (behind everything else that
is due) and the ASGI send path. Once a follower has caught up, this response instead hands the log a
``push`` function that writes each new event's chunk to the client's transport right where the
worker's event is appended. The task wakes only to take over again: for the terminal event (which
ends the response through ASGI, so uvicorn knows it is complete), when the transport has a backlog
(the ASGI send waits for it to drain) or is closing, or when the server is not uvicorn answering
chunked (then it follows the log as before).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import Send

from rbees.httpd import EventStreamResponse, LastFrame, Transport, chunk, raw_transport
from rbees.orchestrator.jobs import EventLog, JobEvent

# Push while the transport holds less than this unsent (uvloop flushes writes at the end of a loop
# turn, so a few frames of one turn are normal); past it, the task's ASGI send waits for the drain.
PUSH_BACKLOG_BYTES = 64 * 1024


class JobEventsResponse(EventStreamResponse):
    def __init__(
        self,
        log: EventLog,
        last_id: int = 0,
        on_disconnect: Callable[[], None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(log.follow_frames(last_id), on_disconnect=on_disconnect, headers=headers)
        self.log = log
        self.last_id = max(0, last_id)

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        transport = raw_transport(send)
        if transport is None:
            await self._send_frames(send)  # follow the log the plain way
            return
        log, index = self.log, self.last_id
        while True:
            batch = log.frames_after(index)
            if batch is not None:
                frames, index, terminal = batch
                if terminal:
                    await send({"type": "http.response.body", "body": LastFrame(frames), "more_body": False})
                    return
                await send({"type": "http.response.body", "body": frames, "more_body": True})
                continue
            if log.closed:
                break
            index = await _pushed(log, index, transport)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _pushed(log: EventLog, index: int, transport: Transport) -> int:
    """Let the log write events to ``transport`` as they come; return the index reached once the
    task must take over again (an event the push did not write is the first it sends)."""
    woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    reached = index

    def push(event: JobEvent) -> bool:
        nonlocal reached
        if (
            woken.done()
            or event.terminal
            or event.id != reached + 1
            or transport.is_closing()
            or transport.get_write_buffer_size() > PUSH_BACKLOG_BYTES
        ):
            if not woken.done():
                woken.set_result(None)
            return False
        transport.write(chunk(event.frame))
        reached = event.id
        return True

    detach = log.push_to(push)
    try:
        await woken
    finally:
        detach()
    return reached
