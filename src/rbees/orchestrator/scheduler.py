"""Worker selection: a pure function of a snapshot of the workers and one job.

``schedule`` runs filters (model, placement pin, health, previous failures, free slots), then the policy
picks one of the survivors. Every worker that was passed over gets a reason, so each placement can be
explained (``GET /v2/tasks/{id}`` shows them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from rbees.orchestrator.settings import Policy


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the scheduler may know about one worker at one instant."""

    worker_id: str
    model: str
    pool: str
    schedulable: bool
    status: str
    slots_total: int
    slots_busy: int
    vram_bytes: int = 0
    memory_free_bytes: int | None = None

    @property
    def slots_free(self) -> int:
        return max(0, self.slots_total - self.slots_busy)


@dataclass(frozen=True, slots=True)
class JobView:
    job_id: str
    model: str
    pin_worker: str | None = None
    pin_pool: str | None = None
    exclude: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    """``worker_id`` is the choice, or ``None`` to wait; ``reasons`` explains every other worker."""

    worker_id: str | None
    policy: str
    reasons: dict[str, str] = field(default_factory=dict)
    wait_reason: str | None = None

    @property
    def waits(self) -> bool:
        return self.worker_id is None


@dataclass(frozen=True, slots=True)
class ScriptChoice:
    """A script policy's answer: ``worker_id`` (``None`` = wait), or the ``error`` that voids it."""

    worker_id: str | None
    error: str | None = None


class Chooser(Protocol):
    """A scripted policy (see ``policy_script``): picks among the free candidates."""

    name: str

    def choose(self, job: JobView, free: list[WorkerView]) -> ScriptChoice: ...


Filter = Callable[[WorkerView, JobView], str | None]


def _model(w: WorkerView, j: JobView) -> str | None:
    return None if w.model == j.model else f"serves model {w.model!r}, not {j.model!r}"


def _pin(w: WorkerView, j: JobView) -> str | None:
    if j.pin_worker is not None and w.worker_id != j.pin_worker:
        return f"placement pins worker {j.pin_worker!r}"
    if j.pin_pool is not None and w.pool != j.pin_pool:
        return f"in pool {w.pool!r}, placement pins pool {j.pin_pool!r}"
    return None


def _health(w: WorkerView, j: JobView) -> str | None:
    return None if w.schedulable else f"not schedulable (status {w.status})"


def _slots(w: WorkerView, j: JobView) -> str | None:
    if w.slots_free > 0:
        return None
    return f"no free slot ({w.slots_busy}/{w.slots_total} busy)"


# Hard filters first; a worker that failed this job is only avoided while another candidate exists.
_HARD_FILTERS: tuple[Filter, ...] = (_model, _pin, _health)


def schedule(
    workers: Sequence[WorkerView],
    job: JobView,
    policy: Policy = Policy.LEAST_LOADED,
    last_pick: str | None = None,
    script: Chooser | None = None,
) -> Decision:
    """Choose a worker for ``job`` or decide it waits.

    ``last_pick`` is the worker the round-robin policy chose last time for this model. A ``script``
    chooses among the free candidates; when it fails, ``policy`` does, and the decision says why.
    """
    reasons: dict[str, str] = {}
    candidates: list[WorkerView] = []
    for w in workers:
        reason = next((r for f in _HARD_FILTERS if (r := f(w, job)) is not None), None)
        if reason is None:
            candidates.append(w)
        else:
            reasons[w.worker_id] = reason
    if not candidates:
        return Decision(None, policy.value, reasons, "no healthy worker serves this model here")

    fresh = [w for w in candidates if w.worker_id not in job.exclude]
    if fresh:
        for w in candidates:
            if w.worker_id in job.exclude:
                reasons[w.worker_id] = "a previous attempt of this job failed there"
        candidates = fresh

    free: list[WorkerView] = []
    for w in candidates:
        reason = _slots(w, job)
        if reason is None:
            free.append(w)
        else:
            reasons[w.worker_id] = reason
    if not free:
        return Decision(None, policy.value, reasons, "every suitable worker is busy")

    label = policy.value
    if script is not None:
        answer = script.choose(job, free)
        if answer.error is None:
            name = f"script:{script.name}"
            for w in free:
                if w.worker_id != answer.worker_id:
                    reasons[w.worker_id] = f"the script chose {answer.worker_id or 'to wait'}"
            wait = None if answer.worker_id else "the policy script chose to wait"
            return Decision(answer.worker_id, name, reasons, wait)
        label = f"{policy.value} (policy script {script.name} failed: {answer.error})"

    chosen = _PICKERS[policy](free, last_pick)
    for w in free:
        if w.worker_id != chosen.worker_id:
            reasons[w.worker_id] = _why_not(policy, w, chosen)
    return Decision(chosen.worker_id, label, reasons)


def _least_loaded(free: list[WorkerView], last_pick: str | None) -> WorkerView:
    # Lowest share of busy slots, then most free slots, then the id for a stable order.
    return min(free, key=lambda w: (w.slots_busy / w.slots_total, -w.slots_free, w.worker_id))


def _round_robin(free: list[WorkerView], last_pick: str | None) -> WorkerView:
    ordered = sorted(free, key=lambda w: w.worker_id)
    if last_pick is None:
        return ordered[0]
    return next((w for w in ordered if w.worker_id > last_pick), ordered[0])


def _most_free_memory(free: list[WorkerView], last_pick: str | None) -> WorkerView:
    # Workers that do not report free memory rank after those that do; ties go to the least loaded.
    def key(w: WorkerView) -> tuple[int, int, float, str]:
        known = w.memory_free_bytes is not None
        return (0 if known else 1, -(w.memory_free_bytes or 0), w.slots_busy / w.slots_total, w.worker_id)

    return min(free, key=key)


_PICKERS: dict[Policy, Callable[[list[WorkerView], str | None], WorkerView]] = {
    Policy.LEAST_LOADED: _least_loaded,
    Policy.ROUND_ROBIN: _round_robin,
    Policy.MOST_FREE_MEMORY: _most_free_memory,
}


def _why_not(policy: Policy, w: WorkerView, chosen: WorkerView) -> str:
    if policy is Policy.LEAST_LOADED:
        return (
            f"least-loaded preferred {chosen.worker_id} "
            f"({chosen.slots_busy}/{chosen.slots_total} busy vs {w.slots_busy}/{w.slots_total})"
        )
    if policy is Policy.ROUND_ROBIN:
        return f"round-robin turn of {chosen.worker_id}"
    return (
        f"most-free-memory preferred {chosen.worker_id} "
        f"({_mem(chosen.memory_free_bytes)} free vs {_mem(w.memory_free_bytes)})"
    )


def _mem(n: int | None) -> str:
    if n is None:
        return "unknown"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n} B"


def plan(
    jobs: Iterable[JobView],
    workers: Sequence[WorkerView],
    policy: Policy = Policy.LEAST_LOADED,
    last_picks: dict[str, str] | None = None,
    script: Chooser | None = None,
) -> tuple[list[tuple[JobView, Decision]], dict[str, str]]:
    """Decide for queued ``jobs`` (in queue order) against one snapshot.

    Each placement takes a slot in the working copy of the snapshot, so a later job sees it busy and a
    freed slot always goes to the earliest job (in priority order) that can use it. Once no worker has a
    free slot the rest of the queue is left alone. Returns the decisions made and the round-robin state.
    """
    picks = dict(last_picks or {})
    view = list(workers)
    out: list[tuple[JobView, Decision]] = []
    for job in jobs:
        if not any(w.slots_free > 0 and w.schedulable for w in view):
            break
        decision = schedule(view, job, policy, picks.get(job.model), script)
        out.append((job, decision))
        if decision.worker_id is not None:
            picks[job.model] = decision.worker_id
            view = [
                replace(w, slots_busy=w.slots_busy + 1) if w.worker_id == decision.worker_id else w
                for w in view
            ]
    return out, picks
