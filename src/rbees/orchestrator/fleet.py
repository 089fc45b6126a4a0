"""The live picture of the registered workers: registration, health, and the slots this orchestrator holds.

Slots in use are counted here, at dispatch and release, rather than read from the workers' health
reports, so a freed slot is seen at once instead of at the next poll. Where the count may be wrong
(a job ended here without the worker confirming it stopped, or a worker that said it is full) the slot
is ``held`` until a health report shows the worker has fewer slots busy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from rbees.orchestrator.health_poller import HealthRules, HealthState, Probe, Target, observe
from rbees.orchestrator.scheduler import WorkerView
from rbees.protocol import WorkerRegistration


class WorkerInfo(BaseModel):
    """One row of ``GET /v2/workers``; the worker's token is never shown."""

    model_config = ConfigDict(frozen=True)

    worker_id: str
    model: str
    uri: str
    backend: str
    device: str
    gpu: int | None
    pool: str
    status: str
    schedulable: bool
    slots_total: int
    slots_busy: int
    slots_busy_reported: int | None
    vram_bytes: int
    registered_at: float
    last_seen: float | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """One model the orchestrator can serve (for ``/v1/models``)."""

    model: str
    workers: int
    schedulable_workers: int
    slots_total: int
    created_at: float


@dataclass
class WorkerEntry:
    reg: WorkerRegistration
    health: HealthState
    registered_at: float
    last_seen: float | None = None
    reported: dict[str, Any] | None = None
    inflight: int = 0
    held: int = 0
    # When the worker last answered (or was added), on the monotonic clock: how long it has been gone.
    last_up: float = field(default_factory=time.monotonic)
    pool: str = field(init=False)  # the registration's pool, else the host of its URI

    def __post_init__(self) -> None:
        self.pool = self.reg.pool or urlsplit(self.reg.uri).hostname or "local"

    @property
    def status(self) -> str:
        if not self.health.up:
            if self.health.unpolled:
                return "unknown"
            return "recovering" if self.health.oks else "unreachable"
        if self.reported is None:
            return "healthy"
        return str(self.reported.get("status", "healthy"))

    @property
    def schedulable(self) -> bool:
        return self.health.up and self.status == "healthy"

    @property
    def slots_total(self) -> int:
        value = (self.reported or {}).get("slots_total")
        return value if isinstance(value, int) and value > 0 else self.reg.slots_total

    def view(self) -> WorkerView:
        rep = self.reported or {}
        free = rep.get("memory_free_bytes", rep.get("vram_free_bytes"))
        vram = rep.get("vram_bytes", self.reg.vram_bytes)
        return WorkerView(
            worker_id=self.reg.worker_id,
            model=self.reg.model_ref,
            pool=self.pool,
            schedulable=self.schedulable,
            status=self.status,
            slots_total=self.slots_total,
            slots_busy=self.inflight + self.held,
            vram_bytes=vram if isinstance(vram, int) else 0,
            memory_free_bytes=free if isinstance(free, int) else None,
        )

    def info(self) -> WorkerInfo:
        busy = (self.reported or {}).get("slots_busy")
        return WorkerInfo(
            worker_id=self.reg.worker_id,
            model=self.reg.model_ref,
            uri=self.reg.uri,
            backend=self.reg.backend.value,
            device=self.reg.device,
            gpu=self.reg.gpu,
            pool=self.pool,
            status=self.status,
            schedulable=self.schedulable,
            slots_total=self.slots_total,
            slots_busy=self.inflight + self.held,
            slots_busy_reported=busy if isinstance(busy, int) else None,
            vram_bytes=self.view().vram_bytes,
            registered_at=self.registered_at,
            last_seen=self.last_seen,
            last_error=self.health.last_error,
        )


class Fleet:
    def __init__(self, rules: HealthRules) -> None:
        self.rules = rules
        self.entries: dict[str, WorkerEntry] = {}

    def add(self, reg: WorkerRegistration, registered_at: float, *, known_up: bool) -> WorkerEntry:
        """A worker that just called back is up; one remembered from before a restart waits for a poll."""
        old = self.entries.get(reg.worker_id)
        entry = WorkerEntry(
            reg=reg,
            health=HealthState(up=known_up, unpolled=not known_up),
            registered_at=registered_at,
            last_seen=registered_at if known_up else None,
            inflight=old.inflight if old else 0,
        )
        self.entries[reg.worker_id] = entry
        return entry

    def remove(self, worker_id: str) -> bool:
        return self.entries.pop(worker_id, None) is not None

    def get(self, worker_id: str) -> WorkerEntry | None:
        return self.entries.get(worker_id)

    def snapshot(self) -> list[WorkerView]:
        return [e.view() for e in self.entries.values()]

    def targets(self) -> list[Target]:
        return [(e.reg.worker_id, e.reg.uri, e.reg.token) for e in self.entries.values()]

    def models(self) -> dict[str, list[WorkerEntry]]:
        out: dict[str, list[WorkerEntry]] = {}
        for e in self.entries.values():
            out.setdefault(e.reg.model_ref, []).append(e)
        return out

    def summaries(self) -> list[ModelSummary]:
        """Every model some registered worker serves, by name."""
        return [
            ModelSummary(
                model=model,
                workers=len(entries),
                schedulable_workers=sum(e.schedulable for e in entries),
                slots_total=sum(e.slots_total for e in entries),
                created_at=min(e.registered_at for e in entries),
            )
            for model, entries in sorted(self.models().items())
        ]

    def pools(self) -> set[str]:
        return {e.pool for e in self.entries.values()}

    def take(self, worker_id: str) -> None:
        entry = self.entries.get(worker_id)
        if entry is not None:
            entry.inflight += 1

    def hold(self, worker_id: str) -> None:
        """Count one more slot busy on a worker until its health report says otherwise."""
        entry = self.entries.get(worker_id)
        if entry is not None:
            entry.held = min(entry.held + 1, entry.slots_total)

    def release(self, worker_id: str) -> None:
        entry = self.entries.get(worker_id)
        if entry is not None and entry.inflight > 0:
            entry.inflight -= 1

    def apply(self, probes: Sequence[Probe], now: float) -> tuple[list[WorkerEntry], bool]:
        """Fold one poll round in. Returns the workers that joined or left scheduling, and whether
        any worker now has more free slots than before (so queued jobs may go out)."""
        flipped: list[WorkerEntry] = []
        freed = False
        wall = time.time()
        for p in probes:
            entry = self.entries.get(p.worker_id)
            if entry is None:
                continue
            before, before_free = entry.schedulable, entry.view().slots_free
            entry.health = observe(entry.health, p.error, now, self.rules)
            if p.error is None:
                entry.last_up = now
            if p.body is not None:
                entry.reported = p.body
                entry.last_seen = wall
                busy = p.body.get("slots_busy")
                if entry.held and isinstance(busy, int):
                    entry.held = max(0, min(entry.held, busy - entry.inflight))
            if before != entry.schedulable:
                flipped.append(entry)
            freed = freed or entry.view().slots_free > before_free
        return flipped, freed
