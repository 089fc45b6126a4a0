"""Admission: everything about a task that can be refused before it is queued."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

from rbees.orchestrator.fleet import Fleet, WorkerEntry
from rbees.protocol import ErrorCode, RbeesError, TaskRequest


def admit(request: TaskRequest, fleet: Fleet, now: float = 0.0, gone_after_s: float = 0.0) -> None:
    """Raise MODEL_NOT_FOUND (404) when no registered worker serves the model, INVALID_REQUEST (400)
    for a placement pin nothing can satisfy, NO_WORKER_AVAILABLE (503) when every worker that could
    take it has been unreachable for ``gone_after_s`` or more (0: never). A worker that is only
    briefly out (a missed poll, a restart), loading or busy does not refuse anything: the job waits."""
    models = fleet.models()
    entries = models.get(request.model)
    if not entries:
        raise RbeesError(
            ErrorCode.MODEL_NOT_FOUND,
            f"no registered worker serves model {request.model!r}",
            details={"available": sorted(models)},
        )
    pin = request.placement
    if pin is not None and pin.worker is not None:
        target = fleet.get(pin.worker)
        if target is None:
            raise RbeesError(ErrorCode.INVALID_REQUEST, f"placement.worker {pin.worker!r} is not registered")
        if target.reg.model_ref != request.model:
            raise RbeesError(
                ErrorCode.INVALID_REQUEST,
                f"placement.worker {pin.worker!r} serves {target.reg.model_ref!r}, not {request.model!r}",
            )
    if pin is not None and pin.pool is not None and not any(e.pool == pin.pool for e in entries):
        raise RbeesError(
            ErrorCode.INVALID_REQUEST, f"no worker in pool {pin.pool!r} serves model {request.model!r}"
        )
    if stranded(candidates(request, fleet), now, gone_after_s):
        raise no_worker(request, gone_after_s)


def candidates(request: TaskRequest, fleet: Fleet) -> list[WorkerEntry]:
    """The registered workers that could ever take the job: its model, within its placement pin."""
    pin = request.placement
    if pin is not None and pin.worker is not None:
        entry = fleet.get(pin.worker)
        found = [entry] if entry is not None and entry.reg.model_ref == request.model else []
    else:
        found = [e for e in fleet.entries.values() if e.reg.model_ref == request.model]
    if pin is not None and pin.pool is not None:
        found = [e for e in found if e.pool == pin.pool]
    return found


def stranded(entries: list[WorkerEntry], now: float, gone_after_s: float) -> bool:
    """No worker left to wait for: none at all, or every one unreachable for ``gone_after_s`` or more
    (``now`` and each worker's ``last_up`` on the monotonic clock). Never with ``gone_after_s`` 0."""
    if gone_after_s <= 0:
        return False
    return all(not e.health.up and now - e.last_up >= gone_after_s for e in entries)


def no_worker(request: TaskRequest, gone_after_s: float) -> RbeesError:
    return RbeesError(
        ErrorCode.NO_WORKER_AVAILABLE,
        f"no worker left that could take a job for model {request.model!r}: each one is gone or has "
        f"not answered for {gone_after_s:g}s",
        retry_after=10,
    )


class _Waiting(Protocol):
    @property
    def request(self) -> TaskRequest: ...


W = TypeVar("W", bound=_Waiting)


def stranded_requests(
    waiting: Iterable[W], fleet: Fleet, now: float, gone_after_s: float
) -> Iterator[tuple[W, RbeesError]]:
    """Each of the ``waiting`` jobs no worker is left to take (see ``stranded``), with its error."""
    # Models some worker may still serve; only jobs pinned to a worker or pool, or for another
    # model, need a closer look.
    live = {e.reg.model_ref for e in fleet.entries.values() if not stranded([e], now, gone_after_s)}
    for job in waiting:
        request = job.request
        if request.placement is None and request.model in live:
            continue
        if stranded(candidates(request, fleet), now, gone_after_s):
            yield job, no_worker(request, gone_after_s)
