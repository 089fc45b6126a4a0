"""``POST /execute`` to plain-HTTP workers on a bare asyncio protocol: the relay's hot path.

Each worker event is parsed and handed to ``on_event`` straight from ``data_received`` (no stream
reader, no task wake-up per chunk), the request head is built once per worker, and connections are
kept alive in a small pool per worker. Behaviour matches ``dispatcher.execute``: ``DispatchRejected``
for an error answer, ``StreamBroken`` when the stream stops before its terminal event, ``OSError`` /
``TimeoutError`` when the worker cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

from rbees.orchestrator.dispatcher import (
    TERMINAL,
    TOKEN_PREFIX,
    DispatchRejected,
    StreamBroken,
    event_type_of,
    rejection,
)
from rbees.orchestrator.worker_channel import Channel, ChannelJob, consume_outcome, open_channel
from rbees.protocol import SSEParser

OnEvent = Callable[[str, str], bool]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
# A worker's event channel that could not be opened is tried again after CHANNEL_RETRY_S; a worker
# that has none (404, an older one) after CHANNEL_UNSUPPORTED_S.
CHANNEL_RETRY_S = 5.0
CHANNEL_UNSUPPORTED_S = 300.0
# Idle connections are dropped well before the workers' own keep-alive (30 s) would close them.
IDLE_S = 15.0
_DRAIN_S = 1.0
_ERROR_BODY_MAX = 1 << 20


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a worker; runs one request at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.got_bytes = False
        self.reused = False  # the current request runs on a connection that served one before
        self._requests = 0
        self._parser = httptools.HttpResponseParser(self)
        self._done: asyncio.Future[None] | None = None
        self._on_event: OnEvent | None = None
        self._sse = SSEParser()
        self._status = 0
        self._error_body: list[bytes] = []
        self._finished = False  # the terminal event (or an early stop) was seen: only draining is left
        self._complete = False  # the whole HTTP response was read
        self._drain_timer: asyncio.TimerHandle | None = None
        self._ack = False  # the job's events come on the worker's channel: only its 202 is awaited

    # --- request ---

    def start(self, request: bytes, on_event: OnEvent | None) -> asyncio.Future[None]:
        """Send ``request``; ``on_event`` gets its stream's events, or, for ``None``, the request
        is a job sent to a channel and the future resolves at the worker's ``202``."""
        assert self.transport is not None
        self._done = asyncio.get_running_loop().create_future()
        self._on_event = on_event
        self._ack = on_event is None
        self._sse = SSEParser()
        self._status = 0
        self._error_body = []
        self._finished = False
        self._complete = False
        self.got_bytes = False
        self._parser = httptools.HttpResponseParser(self)
        self.reused = self._requests > 0
        self._requests += 1
        self.transport.write(request)
        return self._done

    def detach(self) -> None:
        """The caller is gone (cancelled): stop calling it and drop the connection."""
        self._on_event = None
        self.close()

    def close(self) -> None:
        self.closed = True
        self.pool.busy.discard(self)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self._finished:
            return
        if not self.got_bytes:
            reason = f": {exc}" if exc is not None else ""
            self._fail(ConnectionResetError(f"the worker closed the connection before answering{reason}"))
        elif self._status in (0, 200, 202):
            self._fail(StreamBroken("the worker closed the connection before it answered in full"))
        else:
            self._reject()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # Raised by one of the callbacks below, e.g. by on_event or for an event that is not JSON.
            cause = exc.__context__
            self._fail(cause if isinstance(cause, Exception) else StreamBroken(str(exc)))
            self.close()
        except httptools.HttpParserUpgrade:
            self._fail(StreamBroken("the worker answered with an upgrade"))
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(StreamBroken(f"the worker's answer is not valid HTTP: {exc}"))
            self.close()

    # --- httptools callbacks ---

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._finished or (self._ack and self._status == 202):
            return
        if self._status != 200 or self._ack:
            if sum(map(len, self._error_body)) < _ERROR_BODY_MAX:
                self._error_body.append(body)
            return
        on_event = self._on_event
        for msg in self._sse.feed(body):
            if on_event is None:
                return
            data = msg.data
            event_type = "token" if data.startswith(TOKEN_PREFIX) else event_type_of(data)
            if not on_event(event_type, data):
                self._succeed()
                self.close()  # stopped early: the rest of the stream is not wanted
                return
            if event_type in TERMINAL:
                self._succeed()
                if not self._complete:  # read the (empty) rest, so the connection can be reused
                    self._drain_timer = asyncio.get_running_loop().call_later(_DRAIN_S, self.close)
                return

    def on_message_complete(self) -> None:
        self._complete = True
        if self._ack and self._status == 202:
            self._succeed()
        elif self._status != 200 or self._ack:
            self._reject()
        elif not self._finished:
            self._fail(StreamBroken("the worker closed the stream before its end event"))
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if not self.closed:
            if self._parser.should_keep_alive():
                self.pool.release(self)
            else:
                self.close()

    # --- endings ---

    def _succeed(self) -> None:
        self._finished = True
        self._on_event = None
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._finished = True
        self._on_event = None
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)

    def _reject(self) -> None:
        self._fail(rejection(self._status, b"".join(self._error_body)))


class _Pool:
    """Idle keep-alive connections to one worker, and the request head for it."""

    def __init__(self, uri: str, token: str | None) -> None:
        parts = urlsplit(uri)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        host_header = parts.netloc.rpartition("@")[2]
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.head = (
            f"POST {parts.path.rstrip('/')}/execute HTTP/1.1\r\nHost: {host_header}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{auth}Content-Length: "
        ).encode("latin-1")
        self.idle: list[_Conn] = []
        self.busy: set[_Conn] = set()
        self.host_header = host_header
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.channel: Channel | None = None
        self._channel_head = b""
        self.opening: asyncio.Task[None] | None = None
        self._next_open = 0.0  # no new try to open a channel before this (monotonic)

    def live_channel(self, enabled: bool) -> Channel | None:
        """The worker's event channel where one is open; else one starts opening (in the background,
        unless a recent try failed) and this job goes on its own stream."""
        channel = self.channel
        if channel is not None and channel.live:
            return channel
        if enabled and self.opening is None and time.monotonic() >= self._next_open:
            self.opening = asyncio.get_running_loop().create_task(self._open())
        return None

    def channel_request(self, channel: Channel, body: bytes) -> bytes:
        return self._channel_head + b"%d\r\n\r\n%b" % (len(body), body)

    async def _open(self) -> None:
        try:
            channel = await open_channel(
                self.host, self.port, self.host_header, self.prefix, self.token, self._channel_lost
            )
        except DispatchRejected as exc:
            # 404: a worker without channels; anything else (loading, stopping): try again soon.
            wait = CHANNEL_UNSUPPORTED_S if exc.status == 404 else CHANNEL_RETRY_S
            self._next_open = time.monotonic() + wait
            log.debug("no event channel to %s: %s", self.host_header, exc)
        except (OSError, TimeoutError, StreamBroken) as exc:
            self._next_open = time.monotonic() + CHANNEL_RETRY_S
            log.debug("no event channel to %s: %s", self.host_header, exc)
        else:
            self.channel = channel
            # The same head with the channel's header before the Content-Length that ends it.
            marker = self.head.rindex(b"Content-Length: ")
            header = b"X-Rbees-Channel: %s\r\n" % str(channel.id).encode("latin-1")
            self._channel_head = self.head[:marker] + header + self.head[marker:]
        finally:
            self.opening = None

    def _channel_lost(self, channel: Channel) -> None:
        if self.channel is channel:
            self.channel = None

    def take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_S:
                return conn
            conn.close()
        return None

    async def connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        return conn

    def release(self, conn: _Conn) -> None:
        self.busy.discard(conn)
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def close(self) -> None:
        for conn in [*self.idle, *self.busy]:
            conn.close()
        self.idle.clear()
        self.busy.clear()
        if self.opening is not None:
            self.opening.cancel()
        if self.channel is not None:
            self.channel.close()


class Sent:
    """A request already written on a kept-alive connection (``WorkerStreams.send_now``)."""

    __slots__ = ("channel", "conn", "done", "job", "request")

    def __init__(
        self,
        conn: _Conn,
        done: asyncio.Future[None],
        request: bytes,
        channel: Channel | None = None,
        job: ChannelJob | None = None,
    ) -> None:
        self.conn = conn
        self.done = done
        self.request = request
        self.channel = channel
        self.job = job
        # Nobody may wait for it (the job ended before its relay started): the connection then
        # finishes on its own, and its outcome must not be reported as never retrieved.
        done.add_done_callback(consume_outcome)


class WorkerStreams:
    """Keep-alive connections to every worker (plain ``http://`` URIs) for ``POST /execute``, and
    each worker's event channel (``channels``: used where the worker offers one)."""

    def __init__(self, channels: bool = True) -> None:
        self._pools: dict[tuple[str, str | None], _Pool] = {}
        self._channels = channels

    @staticmethod
    def handles(uri: str) -> bool:
        return uri.startswith("http://")

    def _pool(self, uri: str, token: str | None) -> _Pool:
        pool = self._pools.get((uri, token))
        if pool is None:
            pool = self._pools[(uri, token)] = _Pool(uri, token)
        return pool

    def send_now(
        self, uri: str, token: str | None, job_id: str, body: bytes, on_event: OnEvent
    ) -> Sent | None:
        """Write the request at once on an idle kept-alive connection, if there is one, so the worker
        starts on the job before the caller's next await; ``execute(..., sent=)`` then follows it."""
        pool = self._pool(uri, token)
        channel = pool.live_channel(self._channels)
        conn = pool.take_idle()
        if conn is None:
            return None
        pool.busy.add(conn)
        if channel is not None:
            request = pool.channel_request(channel, body)
            job = channel.register(job_id, on_event)
            return Sent(conn, conn.start(request, None), request, channel, job)
        request = pool.head + b"%d\r\n\r\n%b" % (len(body), body)
        return Sent(conn, conn.start(request, on_event), request)

    async def execute(
        self,
        uri: str,
        token: str | None,
        job_id: str,
        body: bytes,
        on_event: OnEvent,
        sent: Sent | None = None,
    ) -> None:
        """Stream one job from a worker into ``on_event(type, json_text)``, called synchronously as each
        event arrives; it returns ``False`` to stop early. Returns after the terminal event.
        ``sent``: the request already went out with ``send_now``."""
        pool = self._pool(uri, token)
        if sent is not None:
            channel, job = sent.channel, sent.job
        else:
            channel = pool.live_channel(self._channels)
            job = channel.register(job_id, on_event) if channel is not None else None
        try:
            if sent is not None:
                conn, done, request = sent.conn, sent.done, sent.request
            else:
                if channel is not None:
                    request = pool.channel_request(channel, body)
                else:
                    request = pool.head + b"%d\r\n\r\n%b" % (len(body), body)
                idle = pool.take_idle()
                conn = idle if idle is not None else await pool.connect()
                pool.busy.add(conn)
                done = conn.start(request, None if job is not None else on_event)
            try:
                await self._answer(pool, conn, done, request, None if job is not None else on_event)
            except (OSError, StreamBroken):
                # The 202 was lost with its connection, but the job's events are coming: it runs.
                if job is None or not job.got_event:
                    raise
            if job is not None:
                await job.done
        finally:
            if channel is not None:
                channel.forget(job_id)

    @staticmethod
    async def _answer(
        pool: _Pool, conn: _Conn, done: asyncio.Future[None], request: bytes, on_event: OnEvent | None
    ) -> None:
        reused = conn.reused
        while True:
            try:
                await done
                return
            except ConnectionResetError:
                # A kept-alive connection the worker closed just as it was reused, before answering
                # anything: the request never reached it, so send it once more on a fresh connection.
                if not (reused and not conn.got_bytes):
                    raise
            except BaseException:
                conn.detach()
                raise
            finally:
                pool.busy.discard(conn)
            conn.close()
            reused = False
            conn = await pool.connect()
            pool.busy.add(conn)
            done = conn.start(request, on_event)

    async def ready_channel(self, uri: str, token: str | None) -> bool:
        """Open the worker's event channel now, if it has none and may (channels on, no recent
        failure); whether one is open."""
        pool = self._pool(uri, token)
        if pool.live_channel(self._channels) is None and pool.opening is not None:
            await asyncio.shield(pool.opening)
        return pool.live_channel(enabled=False) is not None

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
