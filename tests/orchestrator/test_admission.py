"""Admission against a real ``Fleet``: unknown models, impossible pins, and workers long gone (503)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from rbees.orchestrator.admission import admit, candidates, stranded
from rbees.orchestrator.fleet import Fleet
from rbees.orchestrator.health_poller import HealthRules, Probe
from rbees.protocol import ErrorCode, RbeesError, TaskRequest, WorkerRegistration
from tests.orchestrator.conftest import run_orcd

GONE_S = 30.0


def _fleet() -> Fleet:
    fleet = Fleet(HealthRules(fail_threshold=2, recover_threshold=2, flap_window_s=60))
    for worker_id, model, pool in (("w-a", "tiny", "mac"), ("w-b", "tiny", "box"), ("w-q", "qwen", "box")):
        reg = WorkerRegistration(
            worker_id=worker_id,
            uri="http://127.0.0.1:8001",
            model_ref=model,
            backend="cpu",
            device="cpu",
            slots_total=2,
            pool=pool,
        )
        fleet.add(reg, 0.0, known_up=True)
        fleet.entries[worker_id].last_up = 0.0
    return fleet


def _down(fleet: Fleet, worker_id: str, at: float) -> None:
    """Two failed polls at ``at``: out of scheduling from then on."""
    fleet.apply([Probe(worker_id, "connection refused")], at)
    fleet.apply([Probe(worker_id, "connection refused")], at)


def _code(request: TaskRequest, fleet: Fleet, now: float, gone_s: float = GONE_S) -> ErrorCode | None:
    try:
        admit(request, fleet, now, gone_s)
    except RbeesError as exc:
        return exc.code
    return None


def test_a_model_waits_while_a_worker_is_only_briefly_out_and_is_refused_once_all_are_long_gone() -> None:
    fleet, tiny = _fleet(), TaskRequest(model="tiny", prompt="hi")
    _down(fleet, "w-a", 1.0)
    assert _code(tiny, fleet, 100.0) is None  # w-b answers
    _down(fleet, "w-b", 1.0)
    assert _code(tiny, fleet, 29.9) is None  # out, but not for long: wait
    assert _code(tiny, fleet, 30.0) is ErrorCode.NO_WORKER_AVAILABLE
    assert _code(tiny, fleet, 30.0, gone_s=0) is None  # 0: never refused, the queue timeout rules
    assert _code(TaskRequest(model="qwen", prompt="hi"), fleet, 30.0) is None
    # one answer brings the model back, however the worker's health counts it
    fleet.apply([Probe("w-b", None, {"status": "loading"})], 31.0)
    assert _code(tiny, fleet, 60.0) is None
    assert _code(tiny, fleet, 61.0) is ErrorCode.NO_WORKER_AVAILABLE


def test_pins_narrow_the_workers_that_count() -> None:
    fleet = _fleet()
    _down(fleet, "w-a", 1.0)
    on_a = TaskRequest(model="tiny", prompt="hi", placement={"worker": "w-a"})
    in_mac = TaskRequest(model="tiny", prompt="hi", placement={"pool": "mac"})
    in_box = TaskRequest(model="tiny", prompt="hi", placement={"pool": "box"})
    assert [e.reg.worker_id for e in candidates(in_box, fleet)] == ["w-b"]
    assert _code(on_a, fleet, 40.0) is ErrorCode.NO_WORKER_AVAILABLE
    assert _code(in_mac, fleet, 40.0) is ErrorCode.NO_WORKER_AVAILABLE
    assert _code(in_box, fleet, 40.0) is None
    assert _code(TaskRequest(model="nope", prompt="hi"), fleet, 40.0) is ErrorCode.MODEL_NOT_FOUND
    assert _code(TaskRequest(model="qwen", prompt="hi", placement={"worker": "w-a"}), fleet, 0.0) is (
        ErrorCode.INVALID_REQUEST
    )
    # a job whose every candidate left the registry has nobody to wait for
    fleet.remove("w-a")
    assert candidates(on_a, fleet) == [] and stranded([], 0.0, GONE_S)
    assert not stranded([], 0.0, 0)


def test_jobs_for_workers_long_gone_are_refused_or_ended_with_no_worker_available(tmp_path: Path) -> None:
    ghost = {
        "worker_id": "w-ghost",
        "uri": "http://127.0.0.1:9",  # nothing listens there
        "model_ref": "tiny",
        "backend": "cpu",
        "device": "cpu",
        "slots_total": 1,
    }
    flags = ["--health-interval-s", "0.2", "--health-timeout-s", "0.2", "--no-worker-timeout-s", "3"]
    with run_orcd(tmp_path / "state", *flags) as orcd:
        # registered the way `curl -d` would send it: a form content type, a JSON body
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        req = urllib.request.Request(
            orcd.url + "/v2/workers/register", json.dumps(ghost).encode(), form, method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read())["worker_id"] == "w-ghost"
        registered = time.monotonic()
        bad = orcd.call("/v2/workers/register", "POST", raw=b"worker_id=w-x")
        assert bad.status == 400 and bad.body["error"]["code"] == "INVALID_REQUEST"
        orcd.wait_workers({"w-ghost": "unreachable"}, timeout=2.5)
        # out of scheduling, but not for long yet: the job waits for it
        queued = orcd.submit(model="tiny", prompt="anyone?", max_tokens=2)
        assert queued.status == 202 and queued.body["status"] == "queued"
        info = orcd.wait_task(queued.body["job_id"], timeout=10)
        assert 3 <= time.monotonic() - registered < 8  # not the 300 s queue timeout
        assert info["status"] == "failed" and info["error"]["code"] == "NO_WORKER_AVAILABLE"
        replay = orcd.call(f"/v2/tasks/{queued.body['job_id']}/events").body
        last = json.loads(replay.strip().rsplit("data: ", 1)[1])
        assert last["type"] == "error" and last["code"] == "NO_WORKER_AVAILABLE" and last["retriable"] is True
        refused = orcd.submit(model="tiny", prompt="still nobody?", max_tokens=2)
        assert refused.status == 503 and refused.body["error"]["code"] == "NO_WORKER_AVAILABLE"
        assert int(refused.headers["retry-after"]) >= 1
        assert "w-ghost" in orcd.workers() and orcd.workers()["w-ghost"]["status"] == "unreachable"
        assert orcd.call("/v2/workers/w-ghost", "DELETE").status == 200
        gone = orcd.submit(model="tiny", prompt="hello?", max_tokens=2)
        assert gone.status == 404 and gone.body["error"]["code"] == "MODEL_NOT_FOUND"


@pytest.mark.parametrize("value", ["-1", "abc"])
def test_the_no_worker_timeout_must_be_a_non_negative_number(tmp_path: Path, value: str) -> None:
    from rbees.orchestrator.settings import OrchestratorSettings

    with pytest.raises(ValueError):
        OrchestratorSettings(state_dir=tmp_path, no_worker_timeout_s=value)  # type: ignore[arg-type]
