"""``AsyncClient`` against a real orchestrator and worker."""

from __future__ import annotations

import asyncio

import pytest

from rbees.protocol import EndEvent, ErrorEvent, QueuedEvent, StartedEvent, StopReason, TokenEvent
from rbees.sdk import (
    AsyncClient,
    AuthenticationError,
    JobNotFoundError,
    ModelNotFoundError,
)
from tests.sdk.cluster import Cluster


def body(cluster: Cluster, **extra: object) -> dict[str, object]:
    return {"model": cluster.model, "prompt": "Once upon a time", "max_tokens": 16, "seed": 3, **extra}


async def test_stream_and_job(cluster: Cluster) -> None:
    async with AsyncClient(cluster.url, api_token=cluster.api_token) as client:
        stream = client.stream(body(cluster))
        events = [e async for e in stream]
        job = await client.job(stream.job_id or "")
    assert isinstance(events[0], QueuedEvent) and isinstance(events[1], StartedEvent)
    assert isinstance(events[-1], EndEvent) and not any(isinstance(e, ErrorEvent) for e in events)
    text = "".join(e.t for e in events if isinstance(e, TokenEvent))
    assert text and job.status == "completed" and job.tokens_out == events[-1].tokens_out


async def test_resume_with_last_event_id(cluster: Cluster) -> None:
    async with AsyncClient(cluster.url, api_token=cluster.api_token) as client:
        accepted = await client.enqueue(body(cluster))
        async with client.events(accepted.job_id) as first:
            head = [await anext(first) for _ in range(3)]
            last = first.last_event_id
        rest = [e async for e in client.events(accepted.job_id, last_event_id=last)]
        replay = [e async for e in client.events(accepted.job_id)]
    assert last == "3" and head + rest == replay


async def test_cancel_running_job(cluster: Cluster) -> None:
    async with AsyncClient(cluster.url, api_token=cluster.api_token) as client:
        stream = client.stream(body(cluster, max_tokens=256))
        async for event in stream:
            if isinstance(event, TokenEvent):
                break
        assert stream.job_id is not None
        await client.cancel(stream.job_id)
        rest = [e async for e in stream]
        await client.cancel(stream.job_id)  # idempotent
    assert isinstance(rest[-1], EndEvent) and rest[-1].stop_reason is StopReason.CANCELLED


async def test_concurrent_streams_share_one_client(cluster: Cluster) -> None:
    async with AsyncClient(cluster.url, api_token=cluster.api_token) as client:

        async def run(seed: int) -> EndEvent:
            events = [e async for e in client.stream(body(cluster, seed=seed, max_tokens=4))]
            assert isinstance(events[-1], EndEvent)
            return events[-1]

        ends = await asyncio.gather(*(run(s) for s in range(3)))
    assert all(e.tokens_out <= 4 for e in ends)


async def test_typed_errors(cluster: Cluster) -> None:
    async with AsyncClient(cluster.url, api_token=cluster.api_token) as client:
        with pytest.raises(ModelNotFoundError):
            await client.enqueue(body(cluster, model="missing"))
        with pytest.raises(JobNotFoundError):
            [e async for e in client.events("job-missing")]
    async with AsyncClient(cluster.url, api_token="wrong") as client:
        assert (await client.health()).status == "healthy"  # /health is open
        with pytest.raises(AuthenticationError) as denied:
            await client.workers()
    assert denied.value.code == "UNAUTHORIZED" and denied.value.status == 401
    async with AsyncClient(cluster.url) as anonymous:
        with pytest.raises(AuthenticationError):
            await anonymous.job("job-x")
