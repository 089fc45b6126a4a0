"""One attempt against a scripted worker that starts a job and dies before its first token."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from rbees.orchestrator.attempt import Outcome, execute_body, start_attempt
from rbees.orchestrator.jobs import Job
from rbees.orchestrator.metrics import Histogram
from rbees.orchestrator.worker_stream import WorkerStreams
from rbees.protocol import TaskRequest

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def _started_then_dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(ln.split(b":")[1]) for ln in lines if ln.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    event = b'data: {"type":"started","job_id":"x","model":"m","started_at":"now","seed":4242}\n\n'
    writer.write(HEAD + b"%x\r\n%b\r\n" % (len(event), event))
    await writer.drain()
    writer.close()


async def _attempt(job: Job, uri: str, streams: WorkerStreams) -> Outcome:
    async with aiohttp.ClientSession() as session:
        run = start_attempt(session, job, "w-1", uri, None, Histogram("ttft", "t"), streams)
        return (await run()).outcome


async def test_a_retry_before_the_first_token_keeps_the_seed_the_client_was_told() -> None:
    server = await asyncio.start_server(_started_then_dies, "127.0.0.1", 0)
    uri = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    streams = WorkerStreams(channels=False)  # the scripted worker has no /channel
    try:
        job = Job("job-1", TaskRequest(model="m", prompt="hi", max_tokens=4))
        assert b'"seed"' not in execute_body(job)  # the worker chooses
        assert await _attempt(job, uri, streams) is Outcome.RETRY
        started = [e for e in job.log.events if e.type == "started"]
        assert len(started) == 1 and json.loads(started[0].data)["seed"] == 4242
        job.worker_job_id = "job-1.2"
        retry = json.loads(execute_body(job))
        first = json.loads(execute_body(Job("job-1", TaskRequest(model="m", prompt="hi", max_tokens=4))))
        assert retry == {**first, "job_id": "job-1.2", "seed": 4242}

        # a seed the client gave is never replaced
        given = Job("job-2", TaskRequest(model="m", prompt="hi", seed=7))
        assert await _attempt(given, uri, streams) is Outcome.RETRY
        assert json.loads(execute_body(given))["seed"] == 7
    finally:
        streams.close()
        server.close()
        await server.wait_closed()
