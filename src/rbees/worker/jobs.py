"""One generation job, run synchronously in a worker thread: the decode loop and its events.

``run_generation`` pulls token ids from the engine one decode step at a time, turns them into
UTF-8 safe text, holds back possible stop sequences, checks the cancel flag before every step
and emits ``token`` events followed by exactly one terminal event (``end`` or ``error``).
It knows nothing of HTTP: events go to an ``emit`` callback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rbees.protocol import EndEvent, ErrorCode, ErrorEvent, ExecuteRequest, StopReason, TokenEvent
from rbees.protocol.events import Event
from rbees.worker.engines.base import Engine
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
    cancel: threading.Event = field(default_factory=threading.Event)


class _TokenStream:
    """Token events out of text pieces: empty pieces are dropped, ``i`` counts events."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self.count = 0

    def send(self, text: str) -> None:
        if text:
            self._emit(TokenEvent(t=text, i=self.count))
            self.count += 1


def run_generation(engine: Engine, job: Job, emit: Emit) -> StopReason:
    """Generate for ``job`` and emit its token events and one terminal event; return the stop reason."""
    params = job.request
    max_new = min(params.max_tokens, max(0, engine.context_length - len(job.prompt_ids)))
    detok = IncrementalDetokenizer(engine.decode, context=job.prompt_ids)
    stops = StopMatcher(params.stop)
    out = _TokenStream(emit)
    eos = engine.eos_token_ids
    generated = 0
    started = time.perf_counter()
    steps = engine.generate(job.prompt_ids, params, job.seed)
    try:
        while True:
            if job.cancel.is_set():
                reason = StopReason.CANCELLED
                break
            if generated >= max_new:
                reason = StopReason.MAX_TOKENS
                break
            token = next(steps)
            if token in eos:
                reason = StopReason.EOS
                break
            generated += 1
            out.send(stops.feed(detok.push(token)))
            if stops.matched is not None:
                reason = StopReason.STOP_SEQUENCE
                break
        if stops.matched is None:
            out.send(stops.feed(detok.flush()))
            out.send(stops.flush())
            if stops.matched is not None:
                reason = StopReason.STOP_SEQUENCE
    except Exception as exc:  # any failure inside the model ends this job with an error event
        log.exception("job %s failed", job.job_id)
        emit(ErrorEvent(code=ErrorCode.INTERNAL, message=f"generation failed: {type(exc).__name__}: {exc}"))
        return StopReason.ERROR
    finally:
        steps.close()
    elapsed_ms = round((time.perf_counter() - started) * 1000)
    emit(
        EndEvent(
            tokens_out=generated,
            tokens_in=len(job.prompt_ids),
            decode_time_ms=elapsed_ms,
            stop_reason=reason,
            stop_sequence_matched=stops.matched,
        )
    )
    log.info("job %s ended: %s after %d token(s) in %d ms", job.job_id, reason.value, generated, elapsed_ms)
    return reason
