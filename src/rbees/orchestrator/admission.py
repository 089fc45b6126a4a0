"""Admission: everything about a task that can be refused before it is queued."""

from __future__ import annotations

from rbees.orchestrator.fleet import Fleet
from rbees.protocol import ErrorCode, RbeesError, TaskRequest


def admit(request: TaskRequest, fleet: Fleet) -> None:
    """Raise MODEL_NOT_FOUND (404) when no registered worker serves the model, INVALID_REQUEST (400)
    for a placement pin nothing can satisfy. Health does not matter here: a known model waits."""
    models = fleet.models()
    entries = models.get(request.model)
    if not entries:
        raise RbeesError(
            ErrorCode.MODEL_NOT_FOUND,
            f"no registered worker serves model {request.model!r}",
            details={"available": sorted(models)},
        )
    pin = request.placement
    if pin is None:
        return
    if pin.worker is not None:
        target = fleet.get(pin.worker)
        if target is None:
            raise RbeesError(ErrorCode.INVALID_REQUEST, f"placement.worker {pin.worker!r} is not registered")
        if target.reg.model_ref != request.model:
            raise RbeesError(
                ErrorCode.INVALID_REQUEST,
                f"placement.worker {pin.worker!r} serves {target.reg.model_ref!r}, not {request.model!r}",
            )
    if pin.pool is not None and not any(e.pool == pin.pool for e in entries):
        raise RbeesError(
            ErrorCode.INVALID_REQUEST, f"no worker in pool {pin.pool!r} serves model {request.model!r}"
        )
