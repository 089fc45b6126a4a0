"""``JobEventsResponse`` served by a real uvicorn: live events are written from inside ``append``.

The server runs on the test's own loop, so the test appends events exactly as the worker-stream
callback does (synchronously, on the loop) and reads them back over real connections.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from rbees.orchestrator.event_stream import JobEventsResponse
from rbees.orchestrator.jobs import EventLog, Job
from rbees.orchestrator.registry import JobRecord
from rbees.protocol import StopReason, TaskRequest
from tests.support.procs import free_port


@dataclass
class Server:
    url: str
    logs: dict[str, EventLog] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    port = free_port()
    srv = Server(f"http://127.0.0.1:{port}")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        name = scope["path"].strip("/")
        log = srv.logs[name]
        last = int(dict(scope["headers"]).get(b"last-event-id", b"0"))

        def client_gone() -> None:
            srv.gone.append(name)

        if name == "slow":  # a small kernel buffer, so that unread data backs up in the transport
            sock = send.__self__.transport.get_extra_info("socket")  # type: ignore[attr-defined]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        await JobEventsResponse(log, last, on_disconnect=client_gone)(scope, receive, send)

    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http="httptools", log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        await until(lambda: server.started)
    yield srv
    server.should_exit = True
    await asyncio.wait_for(task, 10)


def token(i: int, size: int = 8) -> str:
    return json.dumps({"type": "token", "t": "x" * size, "i": i})


END = '{"type":"end","tokens_out":3,"stop_reason":"MAX_TOKENS"}'


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a condition on the server's side (this loop runs the server, so it cannot block)."""
    async with asyncio.timeout(5):
        while not predicate():  # noqa: ASYNC110 - state of another party, not an event of ours
            await asyncio.sleep(0.005)


def events_of(body: bytes) -> list[tuple[int, dict[str, object]]]:
    out = []
    for block in body.decode().split("\n\n"):
        if block:
            lines = dict(line.split(": ", 1) for line in block.split("\n"))
            out.append((int(lines["id"]), json.loads(lines["data"])))
    return out


class Chunked:
    """An HTTP/1.1 client on one kept-alive connection that reads a chunked response chunk by chunk."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str, rcvbuf: int | None = None) -> Chunked:
        port = int(url.rsplit(":", 1)[1])
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(*await asyncio.open_connection(sock=sock))

    async def get(self, path: str) -> None:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()

    async def chunk(self) -> bytes:
        """The next chunk's payload; b"" for the last chunk of a response."""
        async with asyncio.timeout(10):
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def rest(self) -> bytes:
        parts = []
        while part := await self.chunk():
            parts.append(part)
        return b"".join(parts)

    def close(self) -> None:
        self.writer.close()


async def test_a_caught_up_reader_gets_events_pushed_and_the_connection_stays_usable(server: Server) -> None:
    log = server.logs["job"] = EventLog()
    log.append("queued", '{"type":"queued"}')
    client = await Chunked.open(server.url)
    try:
        await client.get("/job")
        assert await client.chunk() == log.events[0].frame
        await until(lambda: len(log._pushers) == 1)  # caught up: the response waits in push mode
        for i in range(3):
            log.append("token", token(i))
            assert len(log._pushers) == 1, "the push took the event"
            assert await client.chunk() == log.events[-1].frame
        log.append("end", END)  # the terminal event ends the response through ASGI
        assert not log._pushers
        assert await client.chunk() == log.events[-1].frame
        assert await client.chunk() == b""
        # The same connection serves the next request: the framing was right.
        await client.get("/job")
        assert await client.rest() == b"".join(e.frame for e in log.events)
    finally:
        client.close()
    assert server.gone == []


async def test_a_reader_that_falls_behind_is_served_through_asgi_in_order(server: Server) -> None:
    log = server.logs["slow"] = EventLog()
    log.append("queued", '{"type":"queued"}')
    client = await Chunked.open(server.url, rcvbuf=2048)
    try:
        await client.get("/slow")
        await until(lambda: len(log._pushers) == 1)
        handed_over = False
        for i in range(2000):  # ~1 MiB that nobody reads meanwhile
            log.append("token", token(i, size=500))
            handed_over = handed_over or not log._pushers
            await asyncio.sleep(0)
        assert handed_over, "the backlog made the push hand over to the response's task"
        log.append("end", END)
        payload = await client.rest()
    finally:
        client.close()
    ids = [event_id for event_id, _ in events_of(payload)]
    assert ids == list(range(1, 2003)), "every event, once, in order"


async def test_a_reader_that_leaves_is_noticed_and_detached(server: Server) -> None:
    log = server.logs["gone"] = EventLog()
    log.append("queued", '{"type":"queued"}')
    async with aiohttp.ClientSession() as session:
        resp = await session.get(f"{server.url}/gone")
        await resp.content.readuntil(b"\n\n")
        await until(lambda: len(log._pushers) == 1)
        resp.close()
    await until(lambda: server.gone == ["gone"])
    log.append("token", token(0))
    assert not log._pushers


async def test_a_job_known_only_from_its_record_replays_its_end_after_whatever_the_client_saw() -> None:
    done = JobRecord(
        "job-1", "tiny", "interactive", "completed", tokens_in=4, tokens_out=9, stop_reason="EOS"
    )
    for after, want_id in ((0, 1), (-3, 1), (12, 13)):
        log = EventLog.replay_of(done, after_id=after)
        events = [e async for e in log.follow(0)]
        assert [(e.id, e.type) for e in events] == [(want_id, "end")]
        assert json.loads(events[0].data) == {
            "type": "end",
            "tokens_out": 9,
            "decode_time_ms": 0,
            "stop_reason": "EOS",
            "tokens_in": 4,
        }
        assert events[0].frame.startswith(b"id: %d\n" % want_id)
        assert log.closed and log.append("token", "{}") is None
    failed = JobRecord("job-2", "tiny", "batch", "failed", error_code="TIMEOUT", error_message="too slow")
    (event,) = [e async for e in EventLog.replay_of(failed, after_id=5).follow(0)]
    assert (event.id, json.loads(event.data)["code"], json.loads(event.data)["message"]) == (
        6,
        "TIMEOUT",
        "too slow",
    )


def test_an_end_the_orchestrator_writes_itself_says_how_long_the_job_ran() -> None:
    # A forced cancel (the worker never confirmed) and a replay from the record both time the job
    # from its first dispatch; a job cancelled before it reached a worker ran for 0 ms.
    running = Job("job-3", TaskRequest(model="tiny", prompt="hi"))
    running.record.started_at = time.time() - 1.5
    forced = running.end(StopReason.CANCELLED)
    assert forced is not None
    assert 1400 <= json.loads(forced.data)["decode_time_ms"] <= 3000
    queued = Job("job-4", TaskRequest(model="tiny", prompt="hi"))
    never = queued.end(StopReason.CANCELLED)
    assert never is not None and json.loads(never.data)["decode_time_ms"] == 0
    rec = JobRecord("job-5", "tiny", "interactive", "cancelled", stop_reason="CANCELLED")
    rec.started_at, rec.finished_at = 100.0, 102.25
    (replayed,) = EventLog.replay_of(rec).events
    assert json.loads(replayed.data)["decode_time_ms"] == 2250
