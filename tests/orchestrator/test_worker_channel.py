"""The orchestrator's end of a worker's event channel, against a small scripted worker.

The scripted worker answers ``POST /channel`` with a channel (or a 404, as one without channels
does) and ``POST /execute`` sent to it with a 202, then writes the job's lines on the channel as the
job's ``mode`` says. A real worker's side is in tests/worker/test_channel_http.py, and every
orchestrator test against real workers runs over channels.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from rbees.orchestrator.dispatcher import DispatchRejected, StreamBroken
from rbees.orchestrator.worker_stream import WorkerStreams
from rbees.protocol import ErrorCode

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: %b\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _lines(job_id: str) -> list[bytes]:
    j = job_id.encode()
    return [
        b'%b {"type":"started","job_id":"%b"}\n' % (j, j),
        b'%b {"type":"token","t":"%b","i":0}\n' % (j, j),
        b'%b {"type":"end","tokens_out":1,"stop_reason":"MAX_TOKENS"}\n' % j,
    ]


def _json_answer(status: str, body: bytes) -> bytes:
    return b"HTTP/1.1 %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (
        status.encode(),
        len(body),
        body,
    )


class ScriptedWorker:
    def __init__(self, with_channels: bool = True, first_line: bytes | None = None) -> None:
        self.with_channels = with_channels
        self.first_line = first_line  # instead of a good channel id
        self.channels_opened = 0
        self.channel_asks = 0
        self.on_channel: list[str] = []  # job ids sent to the channel
        self.on_stream: list[str] = []  # job ids sent as their own stream
        self.held: list[str] = []
        self.three_held = asyncio.Event()
        self.channel: asyncio.StreamWriter | None = None

    def write_held(self) -> None:
        """The held jobs' lines, interleaved, in one chunk (one round of a worker's decoding)."""
        assert self.channel is not None
        rounds = zip(*(_lines(job_id) for job_id in self.held), strict=True)
        self.channel.write(_chunk(b"".join(line for lines in rounds for line in lines)))
        self.held = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split()[1]
                headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                if path == "/channel":
                    self.channel_asks += 1
                    if not self.with_channels:
                        writer.write(_json_answer("404 Not Found", b'{"error":{"code":"NOT_FOUND"}}'))
                        continue
                    self.channels_opened += 1
                    self.channel = writer
                    writer.write(CHUNKED_HEAD % b"application/x-rbees-channel")
                    writer.write(_chunk(self.first_line or b'{"channel_id":"c%d"}\n' % self.channels_opened))
                    await reader.read()  # the channel stays open until the client closes it
                    return
                body = json.loads(raw)
                job_id, mode = body["job_id"], body.get("mode", "good")
                if headers.get("x-rbees-channel") != f"c{self.channels_opened}":
                    self.on_stream.append(job_id)
                    writer.write(CHUNKED_HEAD % b"text/event-stream")
                    for line in _lines(job_id):
                        writer.write(_chunk(b"data: %b\n\n" % line.partition(b" ")[2].rstrip()))
                    writer.write(b"0\r\n\r\n")
                    continue
                self.on_channel.append(job_id)
                if mode == "busy":
                    err = b'{"error":{"code":"ALL_SLOTS_BUSY","message":"full","retriable":true}}'
                    writer.write(_json_answer("503 Service Unavailable", err))
                    continue
                writer.write(_json_answer("202 Accepted", b'{"job_id":"%b"}' % job_id.encode()))
                channel = self.channel
                assert channel is not None
                if mode == "hold":
                    self.held.append(job_id)
                    if len(self.held) == 3:
                        self.three_held.set()
                elif mode == "garbage":
                    channel.write(_chunk(b"%b not json\n" % job_id.encode()))
                elif mode == "die":
                    channel.write(_chunk(_lines(job_id)[0] + _lines(job_id)[1]))
                    await channel.drain()
                    channel.close()
                else:
                    channel.write(_chunk(b"".join(_lines(job_id))))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection: nothing more to answer on it


@pytest.fixture
async def worker() -> AsyncIterator[tuple[ScriptedWorker, str]]:
    w = ScriptedWorker()
    srv = await asyncio.start_server(w.handle, "127.0.0.1", 0)
    try:
        yield w, f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    finally:
        srv.close()


async def run(streams: WorkerStreams, uri: str, job_id: str, mode: str = "good") -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []

    def on_event(kind: str, data: str) -> bool:
        got.append((kind, data))
        return True

    body = json.dumps({"job_id": job_id, "mode": mode}).encode()
    await asyncio.wait_for(streams.execute(uri, None, job_id, body, on_event), 10)
    return got


def _kinds(events: list[tuple[str, str]]) -> list[str]:
    return [kind for kind, _ in events]


async def test_jobs_share_the_channel_once_it_is_open(worker: tuple[ScriptedWorker, str]) -> None:
    w, uri = worker
    streams = WorkerStreams()
    try:
        # The first job goes on its own stream while the channel opens beside it.
        assert _kinds(await run(streams, uri, "first")) == ["started", "token", "end"]
        assert await streams.ready_channel(uri, None)
        jobs = [asyncio.create_task(run(streams, uri, f"j{n}", "hold")) for n in range(3)]
        await asyncio.wait_for(w.three_held.wait(), 10)
        w.write_held()  # all three jobs' lines in one chunk, interleaved
        results = await asyncio.gather(*jobs)
        for n, events in enumerate(results):
            assert _kinds(events) == ["started", "token", "end"]
            assert json.loads(events[1][1])["t"] == f"j{n}"
        assert w.on_stream == ["first"] and w.on_channel == ["j0", "j1", "j2"]
        assert w.channels_opened == 1
    finally:
        streams.close()


async def test_a_channel_that_breaks_fails_its_jobs_and_is_opened_again(
    worker: tuple[ScriptedWorker, str],
) -> None:
    w, uri = worker
    streams = WorkerStreams()
    try:
        assert await streams.ready_channel(uri, None)
        got: list[tuple[str, str]] = []

        def on_event(kind: str, data: str) -> bool:
            got.append((kind, data))
            return True

        body = json.dumps({"job_id": "doomed", "mode": "die"}).encode()
        with pytest.raises(StreamBroken):
            await asyncio.wait_for(streams.execute(uri, None, "doomed", body, on_event), 10)
        assert _kinds(got) == ["started", "token"]  # what came before the break was relayed
        # The next job goes on its own stream and the channel opens again.
        assert _kinds(await run(streams, uri, "next")) == ["started", "token", "end"]
        assert await streams.ready_channel(uri, None) and w.channels_opened == 2
        assert _kinds(await run(streams, uri, "again")) == ["started", "token", "end"]
        assert w.on_channel == ["doomed", "again"] and w.on_stream == ["next"]
    finally:
        streams.close()


async def test_a_bad_line_ends_its_job_alone(worker: tuple[ScriptedWorker, str]) -> None:
    w, uri = worker
    streams = WorkerStreams()
    try:
        assert await streams.ready_channel(uri, None)
        with pytest.raises(StreamBroken):
            await run(streams, uri, "bad", "garbage")
        assert _kinds(await run(streams, uri, "fine")) == ["started", "token", "end"]
        assert w.channels_opened == 1 and w.on_channel == ["bad", "fine"]
    finally:
        streams.close()


async def test_a_refused_job_on_a_channel_is_a_rejection(worker: tuple[ScriptedWorker, str]) -> None:
    _, uri = worker
    streams = WorkerStreams()
    try:
        assert await streams.ready_channel(uri, None)
        with pytest.raises(DispatchRejected) as caught:
            await run(streams, uri, "full", "busy")
        assert caught.value.status == 503 and caught.value.code is ErrorCode.ALL_SLOTS_BUSY
        assert _kinds(await run(streams, uri, "later")) == ["started", "token", "end"]
    finally:
        streams.close()


async def test_a_worker_without_channels_gets_a_stream_per_job_and_is_not_asked_each_time() -> None:
    w = ScriptedWorker(with_channels=False)
    srv = await asyncio.start_server(w.handle, "127.0.0.1", 0)
    uri = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    streams = WorkerStreams()
    try:
        assert not await streams.ready_channel(uri, None)
        for n in range(3):
            assert _kinds(await run(streams, uri, f"s{n}")) == ["started", "token", "end"]
        assert not await streams.ready_channel(uri, None)
        assert w.on_stream == ["s0", "s1", "s2"] and w.on_channel == []
        assert w.channel_asks == 1  # a worker that has none is asked again only after a while
    finally:
        streams.close()
        srv.close()


@pytest.mark.parametrize(
    "first_line",
    [b'{"channel_id":"c1\\r\\nX-Evil: 1"}\n', b'{"channel_id":""}\n', b"not json\n", b'{"id":"c1"}\n'],
)
async def test_a_channel_without_a_sound_id_is_not_used(first_line: bytes) -> None:
    w = ScriptedWorker(first_line=first_line)
    srv = await asyncio.start_server(w.handle, "127.0.0.1", 0)
    uri = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    streams = WorkerStreams()
    try:
        assert not await streams.ready_channel(uri, None)
        assert _kinds(await run(streams, uri, "s0")) == ["started", "token", "end"]
        assert w.on_stream == ["s0"] and w.on_channel == []
    finally:
        streams.close()
        srv.close()


async def test_channels_off_means_a_stream_per_job(worker: tuple[ScriptedWorker, str]) -> None:
    w, uri = worker
    streams = WorkerStreams(channels=False)
    try:
        assert not await streams.ready_channel(uri, None)
        for n in range(2):
            assert _kinds(await run(streams, uri, f"s{n}")) == ["started", "token", "end"]
        assert w.channels_opened == 0 and w.on_stream == ["s0", "s1"]
    finally:
        streams.close()
