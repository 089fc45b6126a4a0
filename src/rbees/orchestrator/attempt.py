"""One attempt at running a job on one worker: stream its events into the job, and say how it went.

The attempt knows nothing of queues or retries; it reports an ``Outcome`` and the service decides.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import Enum

import aiohttp

from rbees.orchestrator import dispatcher
from rbees.orchestrator.jobs import Job, dumps
from rbees.orchestrator.metrics import Histogram
from rbees.orchestrator.worker_stream import WorkerStreams
from rbees.protocol import ErrorCode, SamplingParams, StopReason

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


async def run_attempt(
    session: aiohttp.ClientSession,
    job: Job,
    worker_id: str,
    uri: str,
    token: str | None,
    ttft: Histogram,
    streams: WorkerStreams | None = None,
) -> Result:
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

    try:
        if streams is not None and streams.handles(uri):
            await streams.execute(uri, token, execute_body(job), on_event)
        else:
            await dispatcher.execute(session, uri, token, execute_body(job), on_event)
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
    params = job.request.model_dump(mode="json", include=_SAMPLING_FIELDS, exclude_none=True)
    params["job_id"] = job.worker_job_id
    return json.dumps(params).encode()


def _stamp_started(job: Job, data: str, worker_id: str) -> str:
    """The worker's ``started`` with the orchestrator's job id and the worker id; notes ``tokens_in``."""
    try:
        fields = json.loads(data)
    except ValueError:
        return data
    if isinstance(fields.get("tokens_in"), int):
        job.record.tokens_in = fields["tokens_in"]
    fields.setdefault("worker_id", worker_id)
    fields["job_id"] = job.id
    return dumps(fields)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
