"""One connection that carries the events of every job a client sends it: ``POST /channel``.

On per-job streams a worker decoding sixteen jobs writes sixteen times per forward pass, and the
orchestrator reads sixteen times and parses sixteen HTTP chunks. On a channel the decode thread
collects what a round of turns produced and writes it in one go when the round is over (``flush``,
called by the decode loop), and the reader gets one chunk per pass.

Wire (docs/CONTRACTS.md): the answer to ``POST /channel`` is a chunked ``application/x-rbees-channel``
body of lines. The first is ``{"channel_id": "..."}``; every later one is ``<job_id> <event JSON>``.
``POST /execute`` with ``X-Rbees-Channel: <channel_id>`` is answered ``202 {"job_id", "channel_id"}``
once the job is admitted (the same errors as ever before that), and the job's events come on the
channel: ``started`` first, then what its stream would carry, the terminal event after the worker
freed the job's slot. A channel whose client goes away cancels all of its jobs.

The writes follow ``FrameSink``: the decode thread writes to the socket itself once the channel's
head is out, and leaves it to the event loop when the socket is full.

    channel = table.open(loop)        # POST /channel
    channel.add(job_id, cancel)       # loop: a job sent to it
    channel.put(line)                 # any thread: kept for the next flush
    channel.flush()                   # decode thread: at the end of a round, before any wait
    channel.put_last(job_id, line)    # loop: a job's terminal event, with everything before it
    channel.close()                   # loop: the client is gone or the worker stops
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import AsyncIterator

from rbees.httpd import LastFrame
from rbees.protocol import ErrorCode, RbeesError
from rbees.worker.direct import FrameSink, Item
from rbees.worker.slots import Flag

log = logging.getLogger(__name__)

CHANNEL_HEADER = "x-rbees-channel"
CHANNEL_MEDIA_TYPE = "application/x-rbees-channel"


class Channel:
    def __init__(self, channel_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.id = channel_id
        self.first = b'{"channel_id":"%s"}\n' % channel_id.encode()
        self._loop = loop
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self.sink = FrameSink(loop, self._queue, on_broken=self._reader_gone)
        # One writer at a time, and the order of the lines; reentrant, as a failed write in ``flush``
        # cancels the jobs (``_cancel_jobs``) under it.
        self._lock = threading.RLock()
        self._pending: list[bytes] = []
        self._jobs: dict[str, Flag] = {}
        self.closed = False

    def add(self, job_id: str, cancel: Flag) -> None:
        with self._lock:
            if self.closed:
                raise RbeesError(ErrorCode.CONFLICT, f"event channel {self.id} is closed")
            self._jobs[job_id] = cancel

    def put(self, line: bytes) -> None:
        with self._lock:
            if not self.closed:
                self._pending.append(line)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                data = b"".join(self._pending)
                self._pending = []
                self.sink.put(data)

    def put_last(self, job_id: str, line: bytes | None) -> None:
        """A job's terminal line (``None``: it ended without one) after every line it had before."""
        with self._lock:
            self._jobs.pop(job_id, None)
            if line is not None and not self.closed:
                self._pending.append(line)
            self.flush()

    def close(self) -> int:
        """No more lines; every job still on the channel is cancelled (how many is returned); its
        answer ends (after what the sink has handed to the loop: those hand-offs are callbacks due)."""
        cancelled = self._cancel_jobs()
        self.sink.close()
        self._loop.call_soon(self._queue.put_nowait, None)
        return cancelled

    def _reader_gone(self) -> None:  # the decode thread: a write failed
        self._cancel_jobs()

    def _cancel_jobs(self) -> int:
        with self._lock:
            self.closed = True
            self._pending = []
            flags = list(self._jobs.values())
            self._jobs.clear()
        for flag in flags:
            flag.set()
        return len(flags)

    async def frames(self) -> AsyncIterator[bytes]:
        """What the loop writes: whatever the decode thread could not (a full socket)."""
        queue = self._queue
        while True:
            item = await queue.get()
            if item is None:
                return
            yield bytes(item) if isinstance(item, LastFrame) else item


class ChannelTable:
    """The open channels; ``flush`` runs in the decode thread, the rest on the loop."""

    def __init__(self) -> None:
        self._by_id: dict[str, Channel] = {}
        self._open: tuple[Channel, ...] = ()  # replaced whole, so the decode thread may iterate it

    def open(self, loop: asyncio.AbstractEventLoop) -> Channel:
        channel = Channel(secrets.token_hex(8), loop)
        self._by_id[channel.id] = channel
        self._open = tuple(self._by_id.values())
        log.info("event channel %s opened", channel.id)
        return channel

    def get(self, channel_id: str) -> Channel:
        channel = self._by_id.get(channel_id)
        if channel is None or channel.closed:
            raise RbeesError(ErrorCode.CONFLICT, f"no open event channel {channel_id!r} on this worker")
        return channel

    def close(self, channel: Channel) -> None:
        if self._by_id.pop(channel.id, None) is None:
            return
        self._open = tuple(self._by_id.values())
        cancelled = channel.close()
        log.info("event channel %s closed; %d running job(s) on it cancelled", channel.id, cancelled)

    def close_all(self) -> None:
        for channel in list(self._by_id.values()):
            self.close(channel)

    def flush(self) -> None:
        for channel in self._open:
            channel.flush()
