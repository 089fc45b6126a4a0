"""Input the orchestrator must refuse with a 400 (and store nothing of), or survive, found by an audit:
registrations it could not use, bodies nested or sized past reason, loose /v1 types, odd headers."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from rbees.httpd import accepts_event_stream
from rbees.orchestrator.registry import Registry
from rbees.orchestrator.service import JobService
from rbees.orchestrator.settings import OrchestratorSettings
from rbees.protocol import Backend, ErrorCode, TaskRequest, WorkerRegistration
from tests.orchestrator.conftest import Orcd, run_orcd

GHOST = {
    "worker_id": "w-ghost",
    "uri": "http://127.0.0.1:9",  # nothing listens there
    "model_ref": "tiny",
    "backend": "cpu",
    "device": "cpu",
    "slots_total": 1,
}
DEEP = ("[" * 5000 + "]" * 5000).encode()


def _header_get(orcd: Orcd, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(orcd.url + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.parametrize(
    "change",
    [
        {"uri": "http://[::1"},  # unclosed IPv6 bracket: once kept the orchestrator from starting
        {"uri": "http://127.0.0.1:99999"},
        {"uri": "http://127.0.0.1:0"},
        {"uri": "http://:8001"},
        {"token": "t\u20acst"},  # not sendable in a header
        {"token": "two words"},
        {"device": "x" * 1000},
        {"pool": "p" * 1000},
        {"gpu": -7},
    ],
)
def test_registrations_the_orchestrator_could_not_use_are_refused_and_nothing_is_kept(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    state = tmp_path / "state"
    with run_orcd(state) as orcd:
        reply = orcd.call("/v2/workers/register", "POST", {**GHOST, **change})
        assert reply.status == 400 and reply.body["error"]["code"] == "INVALID_REQUEST", reply.body
        assert orcd.workers() == {}
    with run_orcd(state) as orcd:  # and it starts again on the same state
        assert orcd.call("/health").status == 200 and orcd.workers() == {}


def test_a_registration_body_past_its_limit_is_refused(tmp_path: Path) -> None:
    with run_orcd(tmp_path / "state") as orcd:
        big = json.dumps({**GHOST, "pad": "x" * 100_000}).encode()
        reply = orcd.call("/v2/workers/register", "POST", raw=big)
        assert reply.status == 400 and "larger than" in reply.body["error"]["message"]
        assert orcd.workers() == {}


def test_a_stored_registration_that_no_longer_reads_is_skipped_not_fatal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    registry = Registry.open(OrchestratorSettings(state_dir=state).db_path)
    # As an older, laxer version could have stored it.
    registry.upsert_worker(
        WorkerRegistration.model_construct(**{**GHOST, "backend": Backend.CPU, "uri": "http://[::1"}), 1.0
    )
    registry.upsert_worker(WorkerRegistration(**{**GHOST, "worker_id": "w-good"}), 1.0)
    assert [r.registration.worker_id for r in registry.workers()] == ["w-good"]
    registry.close()
    with run_orcd(state) as orcd:
        assert set(orcd.workers()) == {"w-good"}


def test_bodies_nested_too_deep_are_400_on_every_route(tmp_path: Path) -> None:
    with run_orcd(tmp_path / "state") as orcd:
        assert orcd.call("/v2/workers/register", "POST", GHOST).status == 200
        for model in (True, False):
            body = b'{"model":"tiny",' if model else b"{"
            reply = orcd.call("/v2/tasks", "POST", raw=body + b'"prompt":"x","a":' + DEEP + b"}")
            assert reply.status == 400 and reply.body["error"]["code"] == "INVALID_REQUEST"
        for path in ("/v1/chat/completions", "/v1/completions"):
            reply = orcd.call(path, "POST", raw=b'{"model":"tiny","prompt":"x","a":' + DEEP + b"}")
            assert reply.status == 400 and reply.body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"max_completion_tokens": 0, "max_tokens": 5}, "max_tokens"),
        ("/v1/chat/completions", {"stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"temperature": True}, "temperature"),
        ("/v1/completions", {"max_tokens": "2"}, "max_tokens"),
    ],
)
def test_v1_takes_its_fields_as_strictly_as_v2(
    tmp_path: Path, path: str, fields: dict[str, Any], param: str
) -> None:
    with run_orcd(tmp_path / "state") as orcd:
        assert orcd.call("/v2/workers/register", "POST", GHOST).status == 200
        body: dict[str, Any] = {"model": "tiny", **fields}
        if "chat" in path:
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = "hi"
        reply = orcd.call(path, "POST", body)
        assert reply.status == 400, reply.body
        assert reply.body["error"]["param"] == param


def test_v1_bodies_past_the_limit_are_refused(tmp_path: Path) -> None:
    with run_orcd(tmp_path / "state") as orcd:
        pad = "x" * (17 * 1024 * 1024)
        raw = json.dumps({"model": "tiny", "prompt": "hi", "pad": pad}).encode()
        reply = orcd.call("/v1/completions", "POST", raw=raw)
        assert reply.status == 400 and "larger than" in reply.body["error"]["message"]


def test_last_event_id_must_be_a_plain_id_within_the_job(tmp_path: Path) -> None:
    with run_orcd(tmp_path / "state") as orcd:
        assert orcd.call("/v2/workers/register", "POST", GHOST).status == 200
        job_id = orcd.submit(model="tiny", prompt="hi", max_tokens=2).body["job_id"]  # queued: 1 event
        events = f"/v2/tasks/{job_id}/events"
        for bad in ("1_0", "+1", " 1 2", "2"):  # 2 is past its one event
            status, body = _header_get(orcd, events, {"Last-Event-ID": bad})
            assert status == 400 and json.loads(body)["error"]["code"] == "INVALID_REQUEST", bad
        assert orcd.call(f"/v2/tasks/{job_id}/cancel", "POST").status == 202
        status, body = _header_get(orcd, events, {"Last-Event-ID": "1"})
        assert status == 200 and b'"stop_reason":"CANCELLED"' in body


@pytest.mark.parametrize(
    ("accept", "stream"),
    [
        ("text/event-stream", True),
        ("Text/Event-Stream", True),
        ("application/json, text/event-stream;q=0.5", True),
        ("text/event-stream;q=0, application/json", False),
        ("text/event-stream; q=0.0", False),
        ("*/*", False),
        ("application/json", False),
        ("", False),
    ],
)
def test_a_stream_is_what_accept_names_with_a_non_zero_q(accept: str, stream: bool) -> None:
    assert accepts_event_stream(accept) is stream


async def test_a_job_that_cannot_be_sent_fails_alone(tmp_path: Path) -> None:
    settings = OrchestratorSettings(state_dir=tmp_path / "state", max_retries=0, health_interval_s=60)
    svc = await JobService.open(settings)
    try:
        # A registration the validation would refuse (a token no header can carry), as if stored
        # by an older version: building the request to it fails.
        bad = WorkerRegistration.model_construct(**{**GHOST, "token": "t\u20acst"})
        svc.fleet.add(bad, 0.0, known_up=True)
        job = svc.submit(TaskRequest(model="tiny", prompt="hi", max_tokens=2))  # does not raise
        await asyncio.wait_for(job.wait_done(), 5)
        end = job.log.events[-1].fields()
        assert end["type"] == "error" and end["code"] == ErrorCode.WORKER_FAILED.value
        assert "could not be sent" in end["message"]
        entry = svc.fleet.get("w-ghost")
        assert entry is not None and entry.inflight == 0
    finally:
        await svc.close()


async def test_a_job_whose_timeout_check_fails_stops_no_other_job_timing_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = await JobService.open(OrchestratorSettings(state_dir=tmp_path / "state", health_interval_s=60))
    try:
        svc.fleet.add(WorkerRegistration(**GHOST), 0.0, known_up=True)
        svc.fleet.take("w-ghost")  # no free slot: the jobs wait in the queue
        doomed = svc.submit(TaskRequest(model="tiny", prompt="hi", max_tokens=2, deadline_ms=200))
        other = svc.submit(TaskRequest(model="tiny", prompt="hi", max_tokens=2, deadline_ms=200))
        checked = svc._time_out

        def breaks_on_doomed(job: Any, now: float) -> None:
            if job is doomed:
                raise RuntimeError("a check that fails for this one job")
            checked(job, now)

        monkeypatch.setattr(svc, "_time_out", breaks_on_doomed)
        await asyncio.wait_for(other.wait_done(), 5)
        assert other.log.events[-1].fields()["code"] == ErrorCode.TIMEOUT.value
        assert not doomed.done and svc._watchdog is not None and not svc._watchdog.done()
    finally:
        await svc.close()
