"""A real rbees-orcd with two real workers serving two tiny models.

``w-llama`` (tiny-llama, 1 slot) and ``w-qwen`` (tiny-qwen, 2 slots) join by calling back to the
orchestrator. Greedy sampling on these random models never meets EOS, so ``max_tokens`` sets how long
a job runs; SIGSTOP on a worker holds a job in place while the queue is arranged around it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
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
    follow,
    run_orcd,
    run_worker,
    sse,
    stream_task,
)

LLAMA, QWEN = "tiny-llama", "tiny-qwen"
QUEUE_SIZE = 20
REGISTRATION_TOKEN = "join-secret"
LONG = {"max_tokens": 240, "temperature": 0.0, "seed": 1}


@dataclass
class Cluster:
    orcd: Orcd
    llama: Worker
    qwen: Worker


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_qwen: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    flags = ["--queue-size", str(QUEUE_SIZE), "--health-interval-s", "0.5", "--health-timeout-s", "0.5"]
    flags += ["--registration-token", REGISTRATION_TOKEN]
    with run_orcd(tmp / "state", *flags) as orcd:
        # Both join with the registration token; w-qwen also wants its own token on every call.
        join = {"callback": orcd.url + "/v2/workers/register", "callback_token": REGISTRATION_TOKEN}
        with (
            run_worker(tiny_llama, "w-llama", tmp, slots=1, **join) as llama,
            run_worker(tiny_qwen, "w-qwen", tmp, slots=2, token="qwen-secret", **join) as qwen,
        ):
            orcd.token = REGISTRATION_TOKEN  # lists workers; client routes are open (no API token)
            orcd.wait_workers({"w-llama": "healthy", "w-qwen": "healthy"})
            yield Cluster(orcd, llama, qwen)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def worker_idle(worker: Worker) -> bool:
    return bool(call(worker.url + "/health").body["slots_busy"] == 0)


async def test_jobs_are_routed_by_model(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as s:
        llama, qwen = await asyncio.gather(
            stream_task(
                s, cluster.orcd, {"model": LLAMA, "prompt": "Hello", "max_tokens": 8, "temperature": 0.0}
            ),
            stream_task(
                s, cluster.orcd, {"model": QWEN, "prompt": "Hello", "max_tokens": 8, "temperature": 0.0}
            ),
        )
    for events, model, worker in ((llama, LLAMA, "w-llama"), (qwen, QWEN, "w-qwen")):
        check_event_log(events)
        assert [e.type for e in events[:2]] == ["queued", "started"]
        assert events[0].id == 1 and events[0].data["queue_position"] == 0
        assert events[1].data["model"] == model and events[1].data["worker_id"] == worker
        assert events[-1].type == "end" and events[-1].data["stop_reason"] == "MAX_TOKENS"
        assert any(e.type == "token" for e in events)
        # the worker's figures for the job, relayed like its other events
        assert events[-2].type == "metrics" and events[-2].data["tokens_out"] == 8
        info = cluster.orcd.task(events[0].data["job_id"])
        assert info["status"] == "completed" and info["worker_id"] == worker
        assert info["tokens_out"] == 8
        assert info["started_at"] and info["first_token_at"] and info["finished_at"]
        other = "w-qwen" if worker == "w-llama" else "w-llama"
        wrong = QWEN if model == LLAMA else LLAMA
        assert info["decision"]["reasons"][other] == f"serves model {wrong!r}, not {model!r}"


def test_admission_rejects_bad_requests_before_queueing(cluster: Cluster) -> None:
    orcd = cluster.orcd
    r = orcd.submit(model="no-such-model", prompt="hi")
    assert r.status == 404 and r.body["error"]["code"] == "MODEL_NOT_FOUND"
    assert set(r.body["error"]["details"]["available"]) == {LLAMA, QWEN}
    for bad in (
        {"model": LLAMA, "prompt": "hi", "max_tokens": 0},
        {"model": LLAMA, "prompt": "hi", "temperature": 9},
        {"model": LLAMA, "prompt": "hi", "messages": [{"role": "user", "content": "x"}]},
        {"model": LLAMA, "prompt": "hi", "priority": "urgent"},
        {"model": LLAMA, "prompt": "hi", "bogus": 1},
        {"model": LLAMA},
        {"model": LLAMA, "prompt": "hi", "placement": {"worker": "w-qwen"}},
        {"model": LLAMA, "prompt": "hi", "placement": {"worker": "nobody"}},
    ):
        r = orcd.submit(**bad)
        assert r.status == 400, (bad, r.body)
        assert r.body["error"]["code"] == "INVALID_REQUEST" and r.body["error"]["retriable"] is False
    r = orcd.call("/v2/tasks", "POST", raw=b"{not json")
    assert r.status == 400 and r.body["error"]["code"] == "INVALID_REQUEST"
    # no model named, and two served: which one is for the client to say
    r = orcd.submit(prompt="hi", max_tokens=2)
    assert r.status == 400 and r.body["error"]["code"] == "INVALID_REQUEST"
    assert "model is required" in r.body["error"]["message"]
    assert set(r.body["error"]["details"]["available"]) == {LLAMA, QWEN}
    assert orcd.call("/v2/tasks/job-nope").body["error"]["code"] == "JOB_NOT_FOUND"
    health = orcd.call("/health").body
    assert health == {"status": "healthy", "pools": 1, "workers": 2, "queue_depth": 0}


def test_interactive_goes_before_batch_when_the_worker_frees_up(cluster: Cluster) -> None:
    orcd, worker = cluster.orcd, cluster.llama
    blocker = orcd.submit(model=LLAMA, prompt="Once upon a time", **LONG).body["job_id"]
    orcd.wait_task(blocker, until=["running"])
    worker.proc.signal(signal.SIGSTOP)
    try:
        order = []
        for name, priority in (
            ("b1", "batch"),
            ("b2", "batch"),
            ("i1", "interactive"),
            ("i2", "interactive"),
        ):
            r = orcd.submit(model=LLAMA, prompt=f"job {name}", max_tokens=4, priority=priority)
            assert r.status == 202 and r.body["status"] == "queued", r.body
            order.append((name, r.body["job_id"]))
        ids = dict(order)
        positions = {name: orcd.task(job_id)["queue_position"] for name, job_id in order}
        assert positions == {"i1": 0, "i2": 1, "b1": 2, "b2": 3}
        waiting = orcd.task(ids["i1"])["decision"]
        assert waiting["worker_id"] is None and waiting["reasons"]["w-llama"] == "no free slot (1/1 busy)"
        assert orcd.call("/health").body["queue_depth"] == 4
        orcd.call(f"/v2/tasks/{blocker}/cancel", "POST")
    finally:
        worker.proc.signal(signal.SIGCONT)
    infos = {name: orcd.wait_task(job_id) for name, job_id in order}
    assert all(i["status"] == "completed" for i in infos.values()), infos
    started = sorted(infos, key=lambda n: infos[n]["started_at"])
    assert started == ["i1", "i2", "b1", "b2"]
    assert orcd.task(blocker)["status"] == "cancelled"


def test_full_queue_is_429_with_retry_after(cluster: Cluster) -> None:
    orcd, worker = cluster.orcd, cluster.llama
    blocker = orcd.submit(model=LLAMA, prompt="Once upon a time", **LONG).body["job_id"]
    orcd.wait_task(blocker, until=["running"])
    worker.proc.signal(signal.SIGSTOP)
    queued = []
    try:
        for i in range(QUEUE_SIZE):
            r = orcd.submit(model=LLAMA, prompt=f"filler {i}", max_tokens=2, priority="batch")
            assert r.status == 202, r.body
            queued.append(r.body["job_id"])
        r = orcd.submit(model=LLAMA, prompt="one too many", max_tokens=2)
        assert r.status == 429
        assert r.body["error"]["code"] == "QUEUE_FULL" and r.body["error"]["retriable"] is True
        assert int(r.headers["retry-after"]) >= 1
        # the other model's queue is the same queue: it is full too
        assert orcd.submit(model=QWEN, prompt="x", max_tokens=2).status == 429
        for job_id in queued:
            assert orcd.call(f"/v2/tasks/{job_id}/cancel", "POST").status == 202
        assert orcd.call("/health").body["queue_depth"] == 0
        assert orcd.submit(model=QWEN, prompt="room again", max_tokens=2).status == 202
    finally:
        orcd.call(f"/v2/tasks/{blocker}/cancel", "POST")
        worker.proc.signal(signal.SIGCONT)
    assert orcd.wait_task(blocker)["status"] == "cancelled"
    assert {orcd.task(j)["status"] for j in queued} == {"cancelled"}
    metrics = orcd.call("/metrics").body
    assert 'rbees_orcd_jobs_rejected_total{code="QUEUE_FULL"} 2' in metrics


async def test_cancel_queued_and_running(cluster: Cluster) -> None:
    orcd = cluster.orcd
    running = orcd.submit(model=LLAMA, prompt="Once upon a time", **LONG).body["job_id"]
    queued = orcd.submit(model=LLAMA, prompt="waiting", max_tokens=4).body["job_id"]
    assert orcd.task(queued)["status"] == "queued"
    orcd.wait_task(running, until=["running"])
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{orcd.url}/v2/tasks/{running}/events") as resp:
            async for event in sse(resp):
                if event.type == "token":
                    break
        r = orcd.call(f"/v2/tasks/{queued}/cancel", "POST")
        assert r.status == 202 and r.body["status"] == "cancelled"
        t0 = time.monotonic()
        assert orcd.call(f"/v2/tasks/{running}/cancel", "POST").status == 202
        info = orcd.wait_task(running, timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert info["status"] == "cancelled" and info["stop_reason"] == "CANCELLED"
        assert 0 < info["tokens_out"] < LONG["max_tokens"]
        # idempotent
        again = orcd.call(f"/v2/tasks/{running}/cancel", "POST")
        assert again.status == 202 and again.body["status"] == "cancelled"
        wait_until(lambda: worker_idle(cluster.llama), 1.0, "the worker's slot is free")
        for job_id, first in ((queued, "queued"), (running, "queued")):
            events = await follow(s, orcd, job_id)
            check_event_log(events)
            assert events[0].type == first
            assert events[-1].type == "end" and events[-1].data["stop_reason"] == "CANCELLED"


async def test_client_disconnect_cancels_and_frees_the_slot(cluster: Cluster) -> None:
    orcd = cluster.orcd
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            orcd.url + "/v2/tasks",
            json={"model": LLAMA, "prompt": "Once upon a time", **LONG},
            headers={"Accept": "text/event-stream"},
        )
        job_id = None
        async for event in sse(resp):
            if event.type == "queued":
                job_id = event.data["job_id"]
            if event.type == "token":
                break
        resp.close()  # drop the connection mid-stream
    assert job_id is not None
    t0 = time.monotonic()
    info = orcd.wait_task(job_id, timeout=5)
    assert info["status"] == "cancelled"
    wait_until(lambda: worker_idle(cluster.llama), 1.0 - (time.monotonic() - t0), "the worker's slot is free")
    assert orcd.workers()["w-llama"]["slots_busy"] == 0


async def test_concurrent_submissions_lose_no_job_and_no_event(cluster: Cluster) -> None:
    orcd = cluster.orcd
    n = 18
    async with aiohttp.ClientSession() as s:

        async def streamed(i: int) -> list[Event]:
            model = LLAMA if i % 2 else QWEN
            return await stream_task(s, orcd, {"model": model, "prompt": f"story {i}", "max_tokens": 6})

        async def submitted_then_followed(i: int) -> list[Event]:
            model = QWEN if i % 2 else LLAMA
            task = {"model": model, "prompt": f"tale {i}", "max_tokens": 6}
            async with s.post(orcd.url + "/v2/tasks", json=task) as r:
                assert r.status == 202
                job_id = (await r.json())["job_id"]
            return await follow(s, orcd, job_id)

        runs = [streamed(i) for i in range(n // 2)] + [submitted_then_followed(i) for i in range(n // 2)]
        logs = await asyncio.gather(*runs)
        job_ids = {log[0].data["job_id"] for log in logs}
        assert len(job_ids) == n
        for log in logs:
            check_event_log(log)
            assert log[0].type == "queued" and log[0].id == 1
            assert log[1].type == "started"
            assert log[-1].type == "end", log[-1].data
            tokens = [e.data["i"] for e in log if e.type == "token"]
            assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
            # a finished job replays the same events, from the start or from any id
            replay = await follow(s, orcd, log[0].data["job_id"])
            assert [(e.id, e.data) for e in replay] == [(e.id, e.data) for e in log]
            tail = await follow(s, orcd, log[0].data["job_id"], last_event_id=2)
            assert [(e.id, e.data) for e in tail] == [(e.id, e.data) for e in log[2:]]
    listed = {t["job_id"] for t in orcd.call("/v2/tasks?limit=1000").body["tasks"]}
    assert job_ids <= listed
    assert all(orcd.task(j)["status"] == "completed" for j in job_ids)


def test_a_worker_that_stops_answering_leaves_scheduling_and_comes_back(cluster: Cluster) -> None:
    orcd, worker = cluster.orcd, cluster.qwen
    worker.proc.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        wait_until(lambda: not orcd.workers()["w-qwen"]["schedulable"], 5, "w-qwen out of scheduling")
        assert time.monotonic() - t0 < 5
        w = orcd.workers()["w-qwen"]
        assert w["status"] == "unreachable" and w["last_error"]
        # a job for its model waits instead of failing
        r = orcd.submit(model=QWEN, prompt="patience", max_tokens=3)
        assert r.status == 202 and r.body["status"] == "queued"
        job_id = r.body["job_id"]
        assert "not schedulable" in orcd.task(job_id)["decision"]["reasons"]["w-qwen"]
    finally:
        worker.proc.signal(signal.SIGCONT)
    wait_until(lambda: orcd.workers()["w-qwen"]["schedulable"], 10, "w-qwen back in scheduling")
    assert orcd.wait_task(job_id)["status"] == "completed"


def test_register_list_and_remove_workers(cluster: Cluster) -> None:
    orcd = cluster.orcd
    ghost = {
        "worker_id": "w-ghost",
        "uri": "http://127.0.0.1:9",
        "model_ref": LLAMA,
        "backend": "cpu",
        "device": "cpu",
        "slots_total": 4,
        "pool": "elsewhere",
        "token": "secret",
    }
    assert orcd.call("/v2/workers/register", "POST", ghost, token="").status == 401
    r = orcd.call("/v2/workers/register", "POST", ghost, token=REGISTRATION_TOKEN)
    assert r.status == 200 and r.body["worker_id"] == "w-ghost" and "token" not in r.body
    listed = orcd.workers()
    assert listed["w-ghost"]["pool"] == "elsewhere" and listed["w-ghost"]["model"] == LLAMA
    assert orcd.call("/health").body["pools"] == 2
    wait_until(lambda: orcd.workers()["w-ghost"]["status"] == "unreachable", 5, "ghost unreachable")
    assert (
        orcd.call("/v2/workers/register", "POST", {**ghost, "extra": 1}, token=REGISTRATION_TOKEN).status
        == 400
    )
    assert orcd.call("/v2/workers/w-ghost", "DELETE").status == 200
    assert "w-ghost" not in orcd.workers()
    r = orcd.call("/v2/workers/w-ghost", "DELETE")
    assert r.status == 404 and r.body["error"]["code"] == "WORKER_NOT_FOUND"
    assert orcd.call("/health").body == {"status": "healthy", "pools": 1, "workers": 2, "queue_depth": 0}
