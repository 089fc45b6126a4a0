"""The orchestrator's end of a worker's event channel (``POST /channel``, see ``rbees.worker.channel``).

One connection per worker carries the events of every job sent to it, each line ``<job_id> <event
JSON>``; the worker writes a whole round of its jobs' tokens at once, and this side reads them in
one chunk and hands each line to its job's ``on_event``, as ``worker_stream`` does per job stream.
A job's ``POST /execute`` then only waits for the worker's ``202`` (``worker_stream``).

A channel that breaks (the worker died, or stops) fails every job still on it with ``StreamBroken``,
which the attempt maps as for a broken stream: retried where no token reached the client, else a
``WORKER_FAILED`` error event.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any, cast

import httptools

from rbees.orchestrator.dispatcher import TERMINAL, TOKEN_PREFIX, StreamBroken, event_type_of, rejection

OnEvent = Callable[[str, str], bool]

OPEN_TIMEOUT_S = 5.0
_CHANNEL_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_ERROR_BODY_MAX = 1 << 16


class ChannelJob:
    """One job waiting for its events on a channel; ``done`` resolves at its terminal event."""

    __slots__ = ("done", "got_event", "on_event")

    def __init__(self, on_event: OnEvent, done: asyncio.Future[None]) -> None:
        self.on_event = on_event
        self.done = done
        self.got_event = False
        done.add_done_callback(consume_outcome)


def consume_outcome(future: asyncio.Future[Any]) -> None:
    """A done-callback for a future nobody may wait for: its exception is not reported as never
    retrieved."""
    if not future.cancelled():
        future.exception()


class Channel(asyncio.Protocol):
    """The connection that asked for the channel, read for as long as the worker keeps it open."""

    def __init__(self, on_lost: Callable[[Channel], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.id: str | None = None
        self.closed = False
        self.jobs: dict[bytes, ChannelJob] = {}
        self.ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(consume_outcome)
        self._on_lost = on_lost
        self._parser = httptools.HttpResponseParser(self)
        self._status = 0
        self._rest = b""
        self._error_body: list[bytes] = []

    @property
    def live(self) -> bool:
        return self.id is not None and not self.closed

    def register(self, job_id: str, on_event: OnEvent) -> ChannelJob:
        job = ChannelJob(on_event, asyncio.get_running_loop().create_future())
        self.jobs[job_id.encode()] = job
        return job

    def forget(self, job_id: str) -> None:
        """Nobody waits for the job any more: lines that still come for it are dropped."""
        self.jobs.pop(job_id.encode(), None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._lose(StreamBroken("the orchestrator closed the worker's event channel"))

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc is not None else ""
        self._lose(StreamBroken(f"the worker's event channel broke{reason}"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:  # the callbacks below raise nothing
            self.close()
            self._lose(StreamBroken(f"the worker's event channel is not valid HTTP: {exc}"))

    # --- httptools callbacks ---

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._status != 200:
            if sum(map(len, self._error_body)) < _ERROR_BODY_MAX:
                self._error_body.append(body)
            return
        lines = (self._rest + body if self._rest else body).split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            if self.id is None:
                self._opened(line)
            else:
                self._line(line)

    def on_message_complete(self) -> None:
        if self._status != 200 and not self.ready.done():
            self.ready.set_exception(rejection(self._status, b"".join(self._error_body)))
        if self.transport is not None:
            self.transport.close()
        self._lose(StreamBroken("the worker ended its event channel"))

    # --- lines ---

    def _opened(self, line: bytes) -> None:
        try:
            channel_id = json.loads(line)["channel_id"]
        except (ValueError, KeyError, TypeError):
            channel_id = None
        if not isinstance(channel_id, str) or not _CHANNEL_ID.fullmatch(channel_id):
            self.close()  # it goes into a header of every job's request: nothing else is taken
            return
        self.id = channel_id
        if not self.ready.done():
            self.ready.set_result(channel_id)

    def _line(self, line: bytes) -> None:
        job_id, _, raw = line.partition(b" ")
        job = self.jobs.get(job_id)
        if job is None:
            return  # a job nobody waits for any more (cancelled, or given up on)
        try:
            data = raw.decode()
            event_type = "token" if data.startswith(TOKEN_PREFIX) else event_type_of(data)
            job.got_event = True
            go_on = job.on_event(event_type, data)
        except Exception as exc:  # noqa: BLE001 - handed on: this job's line or handler failed, it alone ends
            self.jobs.pop(job_id, None)
            if not job.done.done():
                job.done.set_exception(exc)
            return
        if not go_on or event_type in TERMINAL:
            self.jobs.pop(job_id, None)
            if not job.done.done():
                job.done.set_result(None)

    def _lose(self, exc: StreamBroken) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(exc)
        jobs, self.jobs = self.jobs, {}
        for job in jobs.values():
            if not job.done.done():
                job.done.set_exception(exc)
        self._on_lost(self)


async def open_channel(
    host: str, port: int, host_header: str, prefix: str, token: str | None, on_lost: Callable[[Channel], None]
) -> Channel:
    """Connect and ask for a channel; returns once its first line (the channel id) came.
    Raises ``DispatchRejected`` for an error answer (404: a worker without channels), ``OSError`` or
    ``TimeoutError`` where the worker cannot be reached, ``StreamBroken`` for anything else."""
    loop = asyncio.get_running_loop()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"POST {prefix}/channel HTTP/1.1\r\nHost: {host_header}\r\n{auth}Content-Length: 0\r\n\r\n"
    async with asyncio.timeout(OPEN_TIMEOUT_S):
        _, channel = await loop.create_connection(lambda: Channel(on_lost), host, port)
        try:
            assert channel.transport is not None
            channel.transport.write(request.encode("latin-1"))
            await channel.ready
        except BaseException:
            channel.close()
            raise
    return channel
