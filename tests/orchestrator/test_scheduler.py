"""Table tests of the pure scheduler over recorded worker snapshots (data/scheduler_cases.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rbees.orchestrator.scheduler import JobView, WorkerView, plan, schedule
from rbees.orchestrator.settings import Policy

DATA = json.loads((Path(__file__).parent / "data" / "scheduler_cases.json").read_text())


def snapshot(name: str) -> list[WorkerView]:
    return [WorkerView(**w) for w in DATA["snapshots"][name]]


def job(spec: dict[str, Any], job_id: str = "job-1") -> JobView:
    spec = dict(spec)
    exclude = frozenset(spec.pop("exclude", ()))
    return JobView(job_id=job_id, exclude=exclude, **spec)


@pytest.mark.parametrize("case", DATA["cases"], ids=[c["name"] for c in DATA["cases"]])
def test_schedule_table(case: dict[str, Any]) -> None:
    decision = schedule(
        snapshot(case["snapshot"]),
        job(case["job"]),
        Policy(case.get("policy", "least-loaded")),
        case.get("last_pick"),
    )
    expect = case["expect"]
    assert decision.worker_id == expect["worker_id"]
    assert decision.reasons == expect["reasons"]
    assert decision.wait_reason == expect.get("wait_reason")
    # Every worker but the chosen one is explained.
    others = {w.worker_id for w in snapshot(case["snapshot"])} - {decision.worker_id}
    assert set(decision.reasons) == others


def test_plan_gives_a_freed_slot_to_the_first_job_in_queue_order() -> None:
    workers = [WorkerView("w", "m", "p", True, "healthy", slots_total=1, slots_busy=0)]
    queued = [JobView("interactive-1", "m"), JobView("interactive-2", "m"), JobView("batch-1", "m")]
    decisions, _ = plan(queued, workers)
    assert [(j.job_id, d.worker_id) for j, d in decisions] == [("interactive-1", "w")]


def test_plan_does_not_let_a_waiting_model_block_another() -> None:
    workers = [
        WorkerView("w-a", "a", "p", True, "healthy", slots_total=1, slots_busy=1),
        WorkerView("w-b", "b", "p", True, "healthy", slots_total=2, slots_busy=0),
    ]
    queued = [JobView("j1", "a"), JobView("j2", "b"), JobView("j3", "b"), JobView("j4", "b")]
    decisions, _ = plan(queued, workers)
    placed = {j.job_id: d.worker_id for j, d in decisions}
    assert placed == {"j1": None, "j2": "w-b", "j3": "w-b"}  # j4 not even looked at: no slot left


def test_plan_round_robin_spreads_across_workers() -> None:
    workers = [WorkerView(f"w-{i}", "m", "p", True, "healthy", slots_total=4, slots_busy=0) for i in range(3)]
    queued = [JobView(f"j{i}", "m") for i in range(6)]
    decisions, picks = plan(queued, workers, Policy.ROUND_ROBIN)
    assert [d.worker_id for _, d in decisions] == ["w-0", "w-1", "w-2", "w-0", "w-1", "w-2"]
    assert picks == {"m": "w-2"}


def test_plan_least_loaded_fills_evenly() -> None:
    workers = [
        WorkerView("w-big", "m", "p", True, "healthy", slots_total=4, slots_busy=0),
        WorkerView("w-small", "m", "p", True, "healthy", slots_total=2, slots_busy=0),
    ]
    decisions, _ = plan([JobView(f"j{i}", "m") for i in range(7)], workers)
    chosen = [d.worker_id for _, d in decisions]
    assert chosen.count("w-big") == 4 and chosen.count("w-small") == 2
    assert len(decisions) == 6  # the 7th job is left in the queue: no slot remains
