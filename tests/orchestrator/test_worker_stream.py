"""The bare-protocol ``POST /execute`` client against a small scripted HTTP server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from rbees.orchestrator.dispatcher import DispatchRejected, StreamBroken
from rbees.orchestrator.worker_stream import WorkerStreams
from rbees.protocol import ErrorCode


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _events(*bodies: str) -> list[bytes]:
    return [_chunk(f"data: {b}\n\n".encode()) for b in bodies]


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
GOOD = [
    '{"type":"started","job_id":"j"}',
    '{"type":"token","t":"a","i":0}',
    '{"type":"end","tokens_out":1,"stop_reason":"MAX_TOKENS"}',
]


class Server:
    """Answers each request by its JSON body's ``mode``; counts connections and requests."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[dict[str, object]] = []
        self.auth: list[str | None] = []
        self.close_idle = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = json.loads(await reader.readexactly(int(headers["content-length"])))
                self.requests.append(body)
                self.auth.append(headers.get("authorization"))
                mode = body.get("mode", "good")
                if mode == "busy":
                    err = b'{"error":{"code":"ALL_SLOTS_BUSY","message":"full","retriable":true}}'
                    writer.write(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%b" % (len(err), err)
                    )
                elif mode == "broken":
                    writer.write(STREAM_HEAD + b"".join(_events(GOOD[0], GOOD[1])))
                    await writer.drain()
                    writer.close()
                    return
                elif mode == "garbage":
                    writer.write(STREAM_HEAD + b"".join(_events("not json")))
                else:
                    writer.write(STREAM_HEAD)
                    for frame in _events(*GOOD):
                        writer.write(frame)
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
                if self.close_idle:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, str]]:
    s = Server()
    srv = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield s, f"http://127.0.0.1:{port}"
    finally:
        srv.close()


async def run(streams: WorkerStreams, uri: str, mode: str, token: str | None = None) -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []

    def on_event(kind: str, data: str) -> bool:
        got.append((kind, data))
        return True

    body = json.dumps({"mode": mode}).encode()
    await asyncio.wait_for(streams.execute(uri, token, "j", body, on_event), 10)
    return got


async def test_events_in_order_and_the_connection_is_reused(server: tuple[Server, str]) -> None:
    srv, uri = server
    streams = WorkerStreams(channels=False)
    try:
        for _ in range(3):
            got = await run(streams, uri, "good", token="secret")
            assert [k for k, _ in got] == ["started", "token", "end"]
            assert got[1][1] == GOOD[1]
            await asyncio.sleep(0.05)  # the rest of the response is read and the connection pooled
        assert len(srv.requests) == 3 and srv.connections == 1
        assert srv.auth == ["Bearer secret"] * 3
    finally:
        streams.close()


async def test_an_error_answer_is_a_rejection(server: tuple[Server, str]) -> None:
    _, uri = server
    streams = WorkerStreams(channels=False)
    try:
        with pytest.raises(DispatchRejected) as caught:
            await run(streams, uri, "busy")
        assert caught.value.status == 503 and caught.value.code is ErrorCode.ALL_SLOTS_BUSY
        assert caught.value.retriable
        assert [k for k, _ in await run(streams, uri, "good")] == ["started", "token", "end"]
    finally:
        streams.close()


async def test_a_stream_cut_before_its_end_is_broken(server: tuple[Server, str]) -> None:
    _, uri = server
    streams = WorkerStreams(channels=False)
    try:
        with pytest.raises(StreamBroken):
            await run(streams, uri, "broken")
        with pytest.raises(StreamBroken):
            await run(streams, uri, "garbage")
    finally:
        streams.close()


async def test_a_kept_alive_connection_the_worker_closed_is_replaced(server: tuple[Server, str]) -> None:
    srv, uri = server
    srv.close_idle = True
    streams = WorkerStreams(channels=False)
    try:
        for _ in range(3):
            assert [k for k, _ in await run(streams, uri, "good")] == ["started", "token", "end"]
        assert srv.connections == 3
    finally:
        streams.close()


async def test_nothing_listening_is_an_os_error() -> None:
    streams = WorkerStreams(channels=False)
    try:
        with pytest.raises(OSError):
            await run(streams, "http://127.0.0.1:1", "good")
    finally:
        streams.close()
