"""Workers that die or hang, for real: SIGKILL before and after the first token, SIGSTOP mid-stream.

Health polling is slowed right down here so the orchestrator learns of a dead worker only from the
dispatch itself, which is what these tests are about.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.orchestrator.conftest import (
    Event,
    Orcd,
    Worker,
    call,
    check_event_log,
    run_orcd,
    run_worker,
    sse,
    stream_task,
)

MODEL = "tiny-llama"
LONG = {"max_tokens": 240, "temperature": 0.0, "seed": 3}
SILENCE_S = 1.5


@dataclass
class Setup:
    orcd: Orcd
    victim: Worker  # chosen first on ties (ids sort first)
    steady: Worker
    hang: Worker


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("failures")
    flags = [
        "--health-interval-s",
        "60",
        "--silence-timeout-s",
        str(SILENCE_S),
        "--max-retries",
        "2",
        "--retry-backoff-s",
        "0.05",
    ]
    with run_orcd(tmp / "state", *flags) as orcd:
        cb = orcd.url + "/v2/workers/register"
        with (
            run_worker(tiny_llama, "a-victim", tmp, callback=cb) as victim,
            run_worker(tiny_llama, "b-steady", tmp, callback=cb) as steady,
            run_worker(tiny_llama, "c-hang", tmp, callback=cb) as hang,
        ):
            orcd.wait_workers({"a-victim": "healthy", "b-steady": "healthy", "c-hang": "healthy"})
            yield Setup(orcd, victim, steady, hang)


async def test_worker_killed_before_the_job_reaches_it_is_retried_elsewhere(setup: Setup) -> None:
    setup.victim.proc.signal(signal.SIGKILL)
    setup.victim.proc.wait(10)
    assert setup.orcd.workers()["a-victim"]["schedulable"]  # nobody has noticed yet
    async with aiohttp.ClientSession() as s:
        events = await stream_task(
            s, setup.orcd, {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 0.0}
        )
    check_event_log(events)
    assert [e.type for e in events[:2]] == ["queued", "started"]
    assert [e.type for e in events].count("started") == 1
    assert events[1].data["worker_id"] != "a-victim"
    assert events[-1].type == "end" and events[-1].data["stop_reason"] == "MAX_TOKENS"
    info = setup.orcd.task(events[0].data["job_id"])
    assert info["status"] == "completed" and info["attempts"] == 2
    assert len(info["failed_attempts"]) == 1 and "a-victim" in info["failed_attempts"][0]
    assert info["decision"]["reasons"]["a-victim"] == "a previous attempt of this job failed there"


def test_a_task_that_names_no_model_runs_on_the_only_one_served(setup: Setup) -> None:
    r = setup.orcd.submit(prompt="Hello", max_tokens=3, temperature=0.0)
    assert r.status == 202, r.body
    info = setup.orcd.wait_task(r.body["job_id"])
    assert info["status"] == "completed" and info["model"] == MODEL
    bad = setup.orcd.submit(prompt="Hello", max_tokens=0)  # any other fault is reported as before
    assert bad.status == 400 and "max_tokens" in bad.body["error"]["message"], bad.body
    assert setup.orcd.call("/v2/tasks", "POST", raw=b"[1]").status == 400


async def _stream_until_first_token(
    s: aiohttp.ClientSession, orcd: Orcd, worker_id: str
) -> tuple[AsyncIterator[Event], list[Event]]:
    """Start a long job pinned to ``worker_id``; return the rest of its stream and the events so far."""
    resp = await s.post(
        orcd.url + "/v2/tasks",
        json={"model": MODEL, "prompt": "Once upon a time", "placement": {"worker": worker_id}, **LONG},
        headers={"Accept": "text/event-stream"},
    )
    events: list[Event] = []
    stream = sse(resp)
    async for event in stream:
        events.append(event)
        if event.type == "token":
            break
    return stream, events


def _one_event_channel(worker: Worker) -> bool:
    """The worker's jobs reach it over one event channel, opened when it registered."""
    return worker.proc.log_text().count("event channel") == 1


async def test_worker_killed_after_the_first_token_ends_the_job_with_an_error(setup: Setup) -> None:
    async with aiohttp.ClientSession() as s:
        stream, events = await _stream_until_first_token(s, setup.orcd, "b-steady")
        assert _one_event_channel(setup.steady)  # the job's events come on it: its loss must end the job
        setup.steady.proc.signal(signal.SIGSTOP)  # freeze it where it is, then kill it
        setup.steady.proc.signal(signal.SIGKILL)
        killed = time.monotonic()
        async for event in stream:
            events.append(event)
        ended = time.monotonic()
    check_event_log(events)
    assert ended - killed < 1.0
    last = events[-1]
    assert last.type == "error", last.data
    assert last.data["code"] == "WORKER_FAILED" and last.data["retriable"] is True
    assert "b-steady" in last.data["message"]
    assert not [e for e in events if e.type == "end"]
    assert [e.type for e in events].count("started") == 1
    info = setup.orcd.task(events[0].data["job_id"])
    assert info["status"] == "failed" and info["attempts"] == 1
    assert info["error"]["code"] == "WORKER_FAILED" and info["tokens_out"] >= 1


async def test_a_hung_worker_hits_the_silence_timeout(setup: Setup) -> None:
    hang = setup.hang
    try:
        async with aiohttp.ClientSession() as s:
            stream, events = await _stream_until_first_token(s, setup.orcd, "c-hang")
            assert _one_event_channel(hang)
            hang.proc.signal(signal.SIGSTOP)
            stopped = time.monotonic()
            async for event in stream:
                events.append(event)
            waited = time.monotonic() - stopped
    finally:
        hang.proc.signal(signal.SIGCONT)
    check_event_log(events)
    assert SILENCE_S - 0.3 < waited < SILENCE_S + 1.0
    last = events[-1]
    assert last.type == "error" and last.data["code"] == "TIMEOUT" and last.data["retriable"] is True
    assert "sent nothing" in last.data["message"]
    info = setup.orcd.task(events[0].data["job_id"])
    assert info["status"] == "failed" and info["error"]["code"] == "TIMEOUT"
    # The orchestrator told the worker to cancel; once it runs again it frees its slot.
    deadline = time.monotonic() + 10
    while call(hang.url + "/health").body["slots_busy"] != 0:
        assert time.monotonic() < deadline, "the hung job was never cancelled on the worker"
        await asyncio.sleep(0.1)
    metrics = setup.orcd.call("/metrics").body
    assert 'rbees_orcd_timeouts_total{kind="silence"} 1' in metrics


def test_the_deadline_ends_a_job_that_cannot_finish_in_time(setup: Setup) -> None:
    r = setup.orcd.submit(
        model=MODEL, prompt="Once upon a time", placement={"worker": "c-hang"}, deadline_ms=300, **LONG
    )
    assert r.status == 202
    info = setup.orcd.wait_task(r.body["job_id"], timeout=10)
    assert info["status"] == "failed" and info["error"]["code"] == "TIMEOUT"
    assert "deadline" in info["error"]["message"]
