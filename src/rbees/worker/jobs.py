"""One generation job, stepped by the worker's decode thread: its decode steps and its events.

A ``Generation`` pulls token ids from the engine one decode step at a time, turns them into
UTF-8 safe text, holds back possible stop sequences, checks the cancel flag before every step
and emits ``token`` events, then ``metrics`` and exactly one terminal event (``end``; a failure
sends only ``error``).
It knows nothing of HTTP or threads: events go to an ``emit`` callback, and whoever owns the
generation calls ``step()`` (the worker's one decode thread, taking turns among its jobs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from rbees.protocol import (
    EndEvent,
    ErrorCode,
    ErrorEvent,
    ExecuteRequest,
    MetricsEvent,
    StopReason,
    TokenEvent,
)
from rbees.protocol.events import Event
from rbees.worker.engines.base import Engine, GenerateArgs
from rbees.worker.slots import Flag
from rbees.worker.streaming import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]


@dataclass(slots=True)
class Job:
    """A running job as the worker tracks it; ``cancel`` is the only thing other threads touch."""

    job_id: str
    request: ExecuteRequest
    prompt_ids: list[int]
    seed: int
    cancel: Flag = field(default_factory=Flag)


class _TokenStream:
    """Token events out of text pieces: empty pieces are dropped, ``i`` counts events."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self.count = 0

    def send(self, text: str) -> None:
        if text:
            self._emit(TokenEvent(t=text, i=self.count))
            self.count += 1


class Generation:
    """One job's decode, one step at a time, so a single decode thread can take turns among jobs.

    ``step()`` runs at most one forward pass and emits what it produced; it returns ``False`` once
    the job has emitted its terminal event (and freed its KV cache). The cancel flag is checked
    before every step, so a cancelled job stops at its next turn without another forward pass.
    """

    def __init__(self, engine: Engine, job: Job, emit: Emit) -> None:
        params = job.request
        self.job = job
        self.engine = engine
        self.reason: StopReason | None = None
        self._emit = emit
        self._max_new = min(params.max_tokens, max(0, engine.context_length - len(job.prompt_ids)))
        self._detok = IncrementalDetokenizer(engine.decode, context=job.prompt_ids)
        self._stops = StopMatcher(params.stop)
        self._out = _TokenStream(emit)
        self._eos = engine.eos_token_ids
        self._generated = 0
        self._begun = False
        self._started = time.perf_counter()
        self._first_token_at: float | None = None
        self._steps = engine.generate(job.prompt_ids, params, job.seed)

    @property
    def done(self) -> bool:
        return self.reason is not None

    @property
    def awaits_prefill(self) -> bool:
        """Its first step would run the prompt's prefill (it has not begun and is not cancelled)."""
        return not self._begun and self.reason is None and self._max_new > 0 and not self.job.cancel.is_set()

    def generate_args(self) -> GenerateArgs:
        return self.job.prompt_ids, self.job.request, self.job.seed

    def take_steps(self, steps: Generator[int, None, None]) -> None:
        """Before its first step: decode from ``steps`` (its row of a batched prefill) instead."""
        if self._begun:
            raise RuntimeError("the generation has already begun")
        self._steps.close()
        self._steps = steps

    def step(self) -> bool:
        """One decode step (or the job's ending); ``False`` when the job is over."""
        if self.reason is not None:
            return False
        try:
            reason = self._advance()
            if reason is None:
                return True
            if self._stops.matched is None:
                self._out.send(self._stops.feed(self._detok.flush()))
                self._out.send(self._stops.flush())
                if self._stops.matched is not None:
                    reason = StopReason.STOP_SEQUENCE
        except Exception as exc:  # any failure inside the model ends this job with an error event
            log.exception("job %s failed", self.job.job_id)
            self._close(StopReason.ERROR)
            message = f"generation failed: {type(exc).__name__}: {exc}"
            self._emit(ErrorEvent(code=ErrorCode.INTERNAL, message=message))
            return False
        self._close(reason)
        elapsed = time.perf_counter() - self._started
        elapsed_ms = round(elapsed * 1000)
        self._emit(self._metrics(elapsed))
        self._emit(
            EndEvent(
                tokens_out=self._generated,
                tokens_in=len(self.job.prompt_ids),
                decode_time_ms=elapsed_ms,
                stop_reason=reason,
                stop_sequence_matched=self._stops.matched,
            )
        )
        log.info(
            "job %s ended: %s after %d token(s) in %d ms",
            self.job.job_id,
            reason.value,
            self._generated,
            elapsed_ms,
        )
        return False

    def _metrics(self, elapsed: float) -> MetricsEvent:
        """The job's figures on this worker, sent just before its ``end``: tokens per second over the
        whole job, and how long its first token took from the moment the job reached the decoder."""
        extra: dict[str, int] = {"tokens_in": len(self.job.prompt_ids)}
        if self._first_token_at is not None:
            extra["first_token_ms"] = round((self._first_token_at - self._started) * 1000)
        rate = self._generated / elapsed if elapsed > 0 and self._generated else 0.0
        return MetricsEvent(tokens_out=self._generated, tokens_per_second=round(rate, 2), extra=extra)

    def abandon(self) -> None:
        """Drop the job without an event (the worker is stopping): frees its KV cache."""
        if self.reason is None:
            self._close(StopReason.CANCELLED)

    def _advance(self) -> StopReason | None:
        if self.job.cancel.is_set():
            return StopReason.CANCELLED
        if self._generated >= self._max_new:
            return StopReason.MAX_TOKENS
        self._begun = True
        token = next(self._steps)
        if token in self._eos:
            return StopReason.EOS
        self._generated += 1
        if self._first_token_at is None:
            self._first_token_at = time.perf_counter()
        self._out.send(self._stops.feed(self._detok.push(token)))
        if self._stops.matched is not None:
            return StopReason.STOP_SEQUENCE
        return None

    def _close(self, reason: StopReason) -> None:
        self.reason = reason
        self._steps.close()


def run_generation(engine: Engine, job: Job, emit: Emit) -> StopReason:
    """Generate for ``job`` to its end in this thread; return the stop reason."""
    generation = Generation(engine, job, emit)
    while generation.step():
        pass
    assert generation.reason is not None
    return generation.reason
