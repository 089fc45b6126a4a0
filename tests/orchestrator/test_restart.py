"""The orchestrator dies (SIGKILL) mid-job and comes back on the same state directory."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import aiohttp

from tests.orchestrator.conftest import run_orcd, run_worker, sse, wait_worker_ready

MODEL = "tiny-qwen"


async def test_restart_keeps_the_registry_and_fails_the_job_that_was_running(
    tmp_path: Path, tiny_qwen: Path
) -> None:
    state = tmp_path / "state"
    with run_worker(tiny_qwen, "w-survivor", tmp_path) as worker:
        health = wait_worker_ready(worker)
        registration = {
            "worker_id": "w-survivor",
            "uri": worker.url,
            "model_ref": health["model"],
            "backend": "cpu",
            "device": "cpu",
            "slots_total": 1,
        }
        with run_orcd(state) as first:
            assert first.call("/v2/workers/register", "POST", registration).status == 200
            async with aiohttp.ClientSession() as s:
                resp = await s.post(
                    first.url + "/v2/tasks",
                    json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 240, "temperature": 0},
                    headers={"Accept": "text/event-stream"},
                )
                stream = sse(resp)
                async for event in stream:
                    if event.type == "queued":
                        lost_job = event.data["job_id"]
                    if event.type == "token":
                        break
                first.proc.signal(signal.SIGKILL)
                first.proc.wait(10)
                rest = []
                with contextlib.suppress(aiohttp.ClientError):
                    rest = [e.type async for e in stream]
                assert "end" not in rest and "error" not in rest

        with run_orcd(state) as second:
            listed = second.workers()
            assert set(listed) == {"w-survivor"}
            assert listed["w-survivor"]["uri"] == worker.url
            second.wait_workers({"w-survivor": "healthy"}, timeout=10)
            lost = second.task(lost_job)
            assert lost["status"] == "failed"
            assert "stopped while this job was queued or running" in lost["error"]["message"]
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"{second.url}/v2/tasks/{lost_job}/events") as r,
            ):
                replay = [e async for e in sse(r)]
            assert [e.type for e in replay] == ["error"]
            # A client resuming from the events it saw before the restart still gets the job's end,
            # numbered after them (the earlier events themselves are gone).
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"{second.url}/v2/tasks/{lost_job}/events", headers={"Last-Event-ID": "7"}) as r,
            ):
                resumed = [e async for e in sse(r)]
            assert [(e.id, e.type) for e in resumed] == [(8, "error")]
            assert resumed[0].data == replay[0].data
            fresh = second.submit(model=MODEL, prompt="again", max_tokens=4)
            assert fresh.status == 202
            done = second.wait_task(fresh.body["job_id"])
            assert done["status"] == "completed" and done["worker_id"] == "w-survivor"
