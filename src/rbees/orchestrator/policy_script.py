"""Scheduling policy as a Starlark script (the spec's Rhai scripting), sandboxed and time-bounded.

The script defines ``choose(job, workers)``. ``job`` is ``{job_id, model, priority?, pin_worker,
pin_pool}``; ``workers`` lists the workers that passed the hard filters and have a free slot, each
``{worker_id, model, pool, slots_total, slots_busy, slots_free, vram_bytes, memory_free_bytes}``.
It returns one of their ``worker_id`` values, or ``None`` to make the job wait. Starlark has no I/O,
and the evaluation is cancelled after the time bound; a script that fails, overruns or returns
anything else is reported and the built-in policy decides instead.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import starlark as sl

from rbees.orchestrator.scheduler import JobView, ScriptChoice, WorkerView

log = logging.getLogger("rbees.orchestrator.policy")

ENTRY_POINT = "choose"


class ScriptPolicy:
    def __init__(self, name: str, module: sl.FrozenModule, timeout_s: float) -> None:
        self.name = name
        self._module = module
        self._timeout_s = timeout_s
        self.failures = 0

    @classmethod
    def load(cls, path: Path, timeout_ms: int) -> ScriptPolicy:
        """Parse and run the script once; raises ``ValueError`` when it cannot serve as a policy."""
        try:
            ast = sl.parse(path.name, path.read_text())
            module = sl.Module()
            deadline = time.monotonic() + timeout_ms / 1000
            options = sl.EvalOptions(check_cancelled=lambda: time.monotonic() > deadline)
            sl.eval_with(options, module, ast, sl.Globals.standard())
            frozen = module.freeze()
        except (OSError, sl.StarlarkError) as exc:
            raise ValueError(f"policy script {path}: {exc}") from exc
        policy = cls(path.name, frozen, timeout_ms / 1000)
        probe = policy.choose(JobView("probe", "probe"), [])
        if probe.error is not None and "no symbol" in probe.error:
            raise ValueError(f"policy script {path} must define {ENTRY_POINT}(job, workers)")
        policy.failures = 0
        return policy

    def choose(self, job: JobView, free: list[WorkerView]) -> ScriptChoice:
        deadline = time.monotonic() + self._timeout_s
        options = sl.EvalOptions(check_cancelled=lambda: time.monotonic() > deadline)
        try:
            result = self._module.call_with(options, ENTRY_POINT, _job(job), [_worker(w) for w in free])
        except (sl.StarlarkError, ValueError, TypeError) as exc:
            return self._failed(_first_line(exc, time.monotonic() > deadline, self._timeout_s))
        value = result.value
        if value is None:
            return ScriptChoice(None)
        if not isinstance(value, str) or value not in {w.worker_id for w in free}:
            return self._failed(f"returned {value!r}, which is not one of the offered workers")
        return ScriptChoice(value)

    def _failed(self, error: str) -> ScriptChoice:
        self.failures += 1
        if self.failures == 1 or self.failures % 100 == 0:
            log.warning("policy script %s failed (%d so far): %s", self.name, self.failures, error)
        return ScriptChoice(None, error)


def _job(job: JobView) -> dict[str, Any]:
    return {"job_id": job.job_id, "model": job.model, "pin_worker": job.pin_worker, "pin_pool": job.pin_pool}


def _worker(w: WorkerView) -> dict[str, Any]:
    return {
        "worker_id": w.worker_id,
        "model": w.model,
        "pool": w.pool,
        "slots_total": w.slots_total,
        "slots_busy": w.slots_busy,
        "slots_free": w.slots_free,
        "vram_bytes": w.vram_bytes,
        "memory_free_bytes": w.memory_free_bytes,
    }


def _first_line(exc: Exception, overran: bool, timeout_s: float) -> str:
    if overran:
        return f"ran past its time bound of {timeout_s * 1000:g} ms"
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("error:")]
    if lines:
        return lines[0].removeprefix("error:").strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def load_policy_script(path: Path | None, timeout_ms: int, fallback: str) -> ScriptPolicy | None:
    """The configured script, if any; one that cannot load is reported and the built-in policy used."""
    if path is None:
        return None
    try:
        script = ScriptPolicy.load(path, timeout_ms)
    except ValueError as exc:
        log.error("%s; scheduling with the built-in %s policy instead", exc, fallback)
        return None
    log.info("scheduling with policy script %s (fallback %s)", path, fallback)
    return script
