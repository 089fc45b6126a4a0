"""One attempt at running a job on one worker: stream its events into the job, and say how it went.

The attempt knows nothing of queues or retries; it reports an ``Outcome`` and the service decides.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any

import aiohttp

from rbees.orchestrator import dispatcher
from rbees.orchestrator.jobs import Job, dumps
from rbees.orchestrator.metrics import Histogram
from rbees.orchestrator.worker_stream import WorkerStreams
from rbees.protocol import ErrorCode, SamplingParams, StopReason
from rbees.protocol.requests import SEED_LIMIT

_SAMPLING_FIELDS = set(SamplingParams.model_fields)
_WORKER_FULL = frozenset({ErrorCode.ALL_SLOTS_BUSY, ErrorCode.MODEL_LOADING})


class Outcome(Enum):
    ENDED = "ended"  # the job has its terminal event (or was ended elsewhere while streaming)
    RETRY = "retry"  # nothing reached the client that a retry could contradict: try again
    BUSY = "busy"  # the worker said it is full: wait for a slot, this is no failure


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    reason: str | None = None  # why it must be retried
    worker_error: str | None = None  # the worker itself misbehaved (fed to its health)


def start_attempt(
    session: aiohttp.ClientSession,
    job: Job,
    worker_id: str,
    uri: str,
    token: str | None,
    ttft: Histogram,
    streams: WorkerStreams | None = None,
) -> Callable[[], Coroutine[Any, Any, Result]]:
    """Start one attempt; calling what it returns gives the coroutine that waits for its ``Result``.

    Where a kept-alive connection to the worker is idle, the request is written before this returns,
    so the worker starts on the job while the caller goes on (answering its client, dispatching
    other jobs) instead of after the caller's next await. (No coroutine exists until it is called,
    so an attempt whose job ended before anyone waited for it leaves nothing unawaited behind.)
    """
    rec = job.record

    def on_event(event_type: str, data: str) -> bool:
        now = time.monotonic()
        job.last_event_at = now
        if event_type == "token":
            if not job.got_token:
                job.got_token = True
                rec.first_token_at = time.time()
                ttft.observe(now - job.queued_at)
        elif event_type == "started":
            data = _stamp_started(job, data, worker_id)
        job.relaying = True
        try:
            return job.append(event_type, data) is not None
        finally:
            job.relaying = False

    body = execute_body(job)
    if streams is not None and streams.handles(uri):
        job_id = job.worker_job_id
        sent = streams.send_now(uri, token, job_id, body, on_event)
        return lambda: _outcome(
            job, worker_id, lambda: streams.execute(uri, token, job_id, body, on_event, sent)
        )
    return lambda: _outcome(job, worker_id, lambda: dispatcher.execute(session, uri, token, body, on_event))


async def _outcome(job: Job, worker_id: str, stream: Callable[[], Coroutine[Any, Any, None]]) -> Result:
    try:
        await stream()
    except dispatcher.DispatchRejected as exc:
        if exc.code in _WORKER_FULL and not job.got_token:
            return Result(Outcome.BUSY)
        if exc.retriable and not job.got_token:
            return Result(Outcome.RETRY, f"worker {worker_id}: {exc}")
        job.fail(exc.code, exc.message, exc.retriable)
    except (aiohttp.ClientError, OSError, dispatcher.StreamBroken, TimeoutError) as exc:
        reason = f"worker {worker_id} failed: {_describe(exc)}"
        if job.cancel_requested:
            job.end(StopReason.CANCELLED)
        elif not job.got_token:
            return Result(Outcome.RETRY, reason, worker_error=reason)
        else:
            tokens = job.tokens_so_far()
            job.fail(ErrorCode.WORKER_FAILED, f"{reason} after {tokens} token(s)", retriable=True)
        return Result(Outcome.ENDED, worker_error=reason)
    return Result(Outcome.ENDED)


def execute_body(job: Job) -> bytes:
    """The worker's ``/execute`` body: the job's sampling fields and this attempt's worker job id."""
    if job.params_json is None:  # once per job: a retry only changes the id
        job.params_json = job.request.model_dump_json(include=_SAMPLING_FIELDS, exclude_none=True).encode()
    # The fields always hold a prompt or messages, so the object is never empty.
    chosen = job.chosen_seed if job.request.seed is None else None
    seed = b'"seed":%d,' % chosen if chosen is not None else b""
    return b'{"job_id":%s,%b%s' % (json.dumps(job.worker_job_id).encode(), seed, job.params_json[1:])


def _stamp_started(job: Job, data: str, worker_id: str) -> str:
    """The worker's ``started`` with the orchestrator's job id and the worker id; notes ``tokens_in``
    and the seed (a retry before the first token sends a second ``started``, with the same seed)."""
    try:
        fields = json.loads(data)
    except ValueError:
        return data
    if isinstance(fields.get("tokens_in"), int):
        job.record.tokens_in = fields["tokens_in"]
    seed = fields.get("seed")
    if job.chosen_seed is None and type(seed) is int and 0 <= seed <= SEED_LIMIT:
        job.chosen_seed = seed
    fields.setdefault("worker_id", worker_id)
    fields["job_id"] = job.id
    return dumps(fields)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
