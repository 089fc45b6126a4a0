"""The gauges ``/metrics`` shows, read from live state each time it is rendered."""

from __future__ import annotations

from rbees.orchestrator.fleet import Fleet
from rbees.orchestrator.gauges import register_gauges
from rbees.orchestrator.health_poller import HealthRules
from rbees.orchestrator.jobs import Job, JobState
from rbees.orchestrator.metrics import Metrics
from rbees.orchestrator.queue import JobQueue
from rbees.protocol import Priority, TaskRequest, WorkerRegistration


def _reg(worker_id: str) -> WorkerRegistration:
    return WorkerRegistration(
        worker_id=worker_id,
        uri="http://127.0.0.1:8001",
        model_ref="tiny",
        backend="cpu",
        device="cpu",
        slots_total=4,
    )


def _gauge_lines(m: Metrics) -> list[str]:
    return [line for line in m.render().splitlines() if not line.startswith("#") and "_total" not in line]


def test_gauges_follow_the_queue_the_jobs_and_the_fleet() -> None:
    m, queue, active = Metrics(), JobQueue(8), dict[str, Job]()
    fleet = Fleet(HealthRules(fail_threshold=2, recover_threshold=2, flap_window_s=60))
    register_gauges(m, queue, active, fleet)
    fleet.add(_reg("w-a"), 0.0, known_up=True)
    fleet.add(_reg("w-b"), 0.0, known_up=False)
    queue.push("j-1", Priority.INTERACTIVE)
    queue.push("j-2", Priority.BATCH)
    queue.push("j-3", Priority.BATCH)
    running = Job("j-0", TaskRequest(model="tiny", prompt="hi"))
    running.record.status = JobState.RUNNING.value
    active["j-0"] = running
    active["j-1"] = Job("j-1", TaskRequest(model="tiny", prompt="hi"))
    fleet.take("w-a")

    lines = _gauge_lines(m)
    assert 'rbees_orcd_queue_depth{priority="interactive"} 1' in lines
    assert 'rbees_orcd_queue_depth{priority="batch"} 2' in lines
    assert "rbees_orcd_jobs_running 1" in lines
    assert 'rbees_orcd_worker_slots_busy{worker="w-a"} 1' in lines
    assert 'rbees_orcd_worker_slots_busy{worker="w-b"} 0' in lines
    statuses = {e.status for e in fleet.entries.values()}
    assert sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("rbees_orcd_workers{")) == 2
    assert all(f'rbees_orcd_workers{{status="{s}"}}' in "\n".join(lines) for s in statuses)

    # read again at each render: nothing is cached
    active.pop("j-0")
    queue.remove("j-1", Priority.INTERACTIVE)
    lines = _gauge_lines(m)
    assert "rbees_orcd_jobs_running 0" in lines
    assert 'rbees_orcd_queue_depth{priority="interactive"} 0' in lines
