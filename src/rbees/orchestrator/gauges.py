"""The orchestrator's gauges: read from its live state each time ``/metrics`` is scraped."""

from __future__ import annotations

from collections.abc import Mapping

from rbees.orchestrator.fleet import Fleet
from rbees.orchestrator.jobs import Job, JobState
from rbees.orchestrator.metrics import Labels, Metrics
from rbees.orchestrator.queue import JobQueue


def register_gauges(m: Metrics, queue: JobQueue, active: Mapping[str, Job], fleet: Fleet) -> None:
    """``active``: the jobs not finished yet (queued or running), kept up to date by the caller."""

    def queue_depth() -> dict[Labels, float]:
        return {(("priority", p.value),): float(queue.depth(p)) for p in queue.priorities}

    def running() -> dict[Labels, float]:
        return {(): float(sum(1 for j in active.values() if j.state is JobState.RUNNING))}

    def workers() -> dict[Labels, float]:
        out: dict[Labels, float] = {}
        for e in fleet.entries.values():
            key: Labels = (("status", e.status),)
            out[key] = out.get(key, 0.0) + 1
        return out

    def slots() -> dict[Labels, float]:
        return {(("worker", e.reg.worker_id),): float(e.inflight) for e in fleet.entries.values()}

    m.gauge("queue_depth", "Jobs waiting, by priority.", queue_depth)
    m.gauge("jobs_running", "Jobs dispatched to a worker and not finished.", running)
    m.gauge("workers", "Registered workers, by status.", workers)
    m.gauge("worker_slots_busy", "Slots this orchestrator holds on each worker.", slots)
