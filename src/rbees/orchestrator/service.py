"""``JobService``: the orchestrator's one in-process entry point.

Admission, the queue, scheduling, dispatch with retry, cancellation, timeouts and the worker registry
all live behind it, so every API on top (``/v2`` here, the OpenAI-compatible ``/v1``) gets the same
behaviour::

    job = service.submit(TaskRequest(...))        # raises RbeesError: 404, 400, 429, 503
    async for event in job.events(last_id=0):      # JobEvent(id, type, data, frame), ends at end|error
        ...
    service.cancel(job.id)                          # idempotent

Concurrency model: one event loop; every state change happens in plain (non-awaiting) methods, so no
locks are needed. The only awaits are network I/O in the per-job relay tasks and the health poller.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

import aiohttp

from rbees.orchestrator import dispatcher
from rbees.orchestrator.admission import admit, stranded_requests
from rbees.orchestrator.attempt import Outcome, Result, start_attempt
from rbees.orchestrator.fleet import Fleet, ModelSummary, WorkerInfo
from rbees.orchestrator.gauges import register_gauges
from rbees.orchestrator.health_poller import HealthPoller, HealthRules, Probe
from rbees.orchestrator.jobs import EventLog, Job, JobState, TaskInfo, task_info
from rbees.orchestrator.metrics import Metrics
from rbees.orchestrator.policy_script import load_policy_script
from rbees.orchestrator.queue import JobQueue
from rbees.orchestrator.registry import JobRecord, JobWriter, Registry
from rbees.orchestrator.scheduler import JobView, plan
from rbees.orchestrator.settings import OrchestratorSettings
from rbees.orchestrator.timeouts import Clock, Limits, deadline_at, expired
from rbees.orchestrator.worker_stream import WorkerStreams
from rbees.protocol import (
    ErrorCode,
    OrchestratorHealth,
    RbeesError,
    StopReason,
    TaskRequest,
    WorkerRegistration,
)

log = logging.getLogger("rbees.orchestrator")

_WATCH_INTERVAL_S = 0.1
_IDLE_WATCH_INTERVAL_S = 1.0
_WORKER_CANCEL_TIMEOUT_S = 2.0
_BUSY = "the worker is busy"


class JobService:
    def __init__(
        self, settings: OrchestratorSettings, registry: Registry, session: aiohttp.ClientSession
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.writer = JobWriter(settings.db_path)
        self.session = session
        self.streams = WorkerStreams(channels=settings.worker_channels)
        self.metrics = Metrics()
        self.fleet = Fleet(
            HealthRules(
                fail_threshold=settings.health_fail_threshold,
                recover_threshold=settings.health_recover_threshold,
                flap_window_s=settings.health_flap_window_s,
            )
        )
        self.queue = JobQueue(settings.queue_size)
        self._limits = Limits(
            settings.queue_timeout_s, settings.first_token_timeout_s, settings.silence_timeout_s
        )
        self._jobs: dict[str, Job] = {}
        self._active: dict[str, Job] = {}
        self._finished: OrderedDict[str, float] = OrderedDict()
        self._picks: dict[str, str] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._poller = HealthPoller(
            session,
            self.fleet.targets,
            self._apply_probes,
            settings.health_interval_s,
            settings.health_timeout_s,
        )
        self._watchdog: asyncio.Task[None] | None = None
        self._tick_error_at = float("-inf")
        self.script = load_policy_script(
            settings.policy_script, settings.policy_script_timeout_ms, settings.policy.value
        )
        register_gauges(self.metrics, self.queue, self._active, self.fleet)

    @classmethod
    async def open(cls, settings: OrchestratorSettings) -> JobService:
        """Open the state directory, recover from a previous run and start polling and the watchdog."""
        registry = Registry.open(settings.db_path)
        failed = registry.fail_unfinished(
            time.time(), "the orchestrator stopped while this job was queued or running"
        )
        if failed:
            log.warning("marked %d unfinished job(s) from the previous run as failed", failed)
        service = cls(settings, registry, dispatcher.new_session())
        for rec in registry.workers():
            service.fleet.add(rec.registration, rec.registered_at, known_up=False)
        service._poller.start()
        service._watchdog = asyncio.create_task(service._watch(), name="rbees-watchdog")
        return service

    async def close(self) -> None:
        """Fail what is still running (SHUTTING_DOWN), tell the workers, and release everything."""
        self._closing = True
        await self._poller.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        for job in list(self._active.values()):
            job.fail(ErrorCode.SHUTTING_DOWN, "the orchestrator is shutting down", retriable=True)
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        pending = tasks + list(self._background)
        if pending:
            await asyncio.wait(pending, timeout=_WORKER_CANCEL_TIMEOUT_S + 0.5)
        self.streams.close()
        await self.session.close()
        self.writer.close()
        self.registry.close()

    # --- workers ------------------------------------------------------------------------------------

    def register_worker(self, reg: WorkerRegistration) -> WorkerInfo:
        now = time.time()
        self.registry.upsert_worker(reg, now)
        entry = self.fleet.add(reg, now, known_up=True)
        log.info("worker %s registered: model %s at %s", reg.worker_id, reg.model_ref, reg.uri)
        if self.streams.handles(reg.uri):  # its event channel, ready before the jobs come
            self._spawn(self.streams.ready_channel(reg.uri, reg.token))
        self._pump()
        return entry.info()

    def deregister_worker(self, worker_id: str) -> None:
        known = self.fleet.remove(worker_id)
        deleted = self.registry.delete_worker(worker_id)
        if not (known or deleted):
            raise RbeesError(ErrorCode.WORKER_NOT_FOUND, f"no worker {worker_id!r} is registered")
        log.info("worker %s deregistered", worker_id)

    def workers(self) -> list[WorkerInfo]:
        return [e.info() for e in self.fleet.entries.values()]

    def models(self) -> list[ModelSummary]:
        return self.fleet.summaries()

    def health(self) -> OrchestratorHealth:
        return OrchestratorHealth(
            status="draining" if self._closing else "healthy",
            pools=len(self.fleet.pools()),
            workers=len(self.fleet.entries),
            queue_depth=len(self.queue),
        )

    async def _apply_probes(self, probes: Sequence[Probe], now: float) -> None:
        flipped, freed = self.fleet.apply(probes, now)
        for entry in flipped:
            verb = "back in" if entry.schedulable else "out of"
            log.warning(
                "worker %s is %s scheduling (%s%s)",
                entry.reg.worker_id,
                verb,
                entry.status,
                f": {entry.health.last_error}" if entry.health.last_error else "",
            )
        if flipped or freed:
            self._pump()

    # --- jobs: submit, follow, cancel --------------------------------------------------------------

    def submit(self, request: TaskRequest) -> Job:
        """Admit and queue a job; raises ``RbeesError`` (404 MODEL_NOT_FOUND, 400, 429 QUEUE_FULL, 503)."""
        try:
            if self._closing:
                raise RbeesError(ErrorCode.SHUTTING_DOWN, "the orchestrator is shutting down", retry_after=5)
            admit(request, self.fleet, time.monotonic(), self.settings.no_worker_timeout_s)
            job = Job("job-" + secrets.token_hex(12), request, on_done=self._on_done)
            position = self.queue.push(job.id, request.priority)
        except RbeesError as exc:
            self.metrics.rejected.inc(code=exc.code.value)
            raise
        job.accepted_position = position
        job.deadline_at = deadline_at(job.queued_at, self.settings.total_timeout_s, request.deadline_ms)
        self._jobs[job.id] = job
        self._active[job.id] = job
        # Job ids are [a-z0-9-] (made above), so the event needs no JSON encoder.
        job.append("queued", f'{{"type":"queued","job_id":"{job.id}","queue_position":{position}}}')
        self.metrics.submitted.inc(priority=request.priority.value)
        self._pump()
        # Durable from the next turn of the loop on, after the dispatch this may have scheduled.
        self.writer.put(job.record, soon=True)
        return job

    def get(self, job_id: str) -> Job | None:
        """The live job (queued, running, or finished and still retained in memory)."""
        return self._jobs.get(job_id)

    def event_log(self, job_id: str, last_id: int = 0) -> tuple[EventLog, int]:
        """A job's events and the index to follow them from, for a client that saw up to ``last_id``:
        the live log, or a job known from the database alone replayed as its terminal event."""
        job = self._jobs.get(job_id)
        if job is not None:
            if last_id > len(job.log):
                raise RbeesError(
                    ErrorCode.INVALID_REQUEST,
                    f"Last-Event-ID {last_id} is past the last event of job {job_id!r} ({len(job.log)})",
                )
            return job.log, last_id
        return EventLog.replay_of(self._stored(job_id), after_id=last_id), 0

    def info(self, job_id: str) -> TaskInfo:
        job = self._jobs.get(job_id)
        if job is not None:
            return self._info(job)
        return task_info(self._stored(job_id), self.events_url(job_id))

    def _stored(self, job_id: str) -> JobRecord:
        rec = self.registry.get_job(job_id)
        if rec is None:
            raise RbeesError(ErrorCode.JOB_NOT_FOUND, f"no job {job_id!r}")
        return rec

    def list_tasks(self, limit: int = 100, status: str | None = None) -> list[TaskInfo]:
        """Newest first: the jobs in memory, then older ones from the database."""
        live = [j for j in self._jobs.values() if status is None or j.record.status == status]
        live.sort(key=lambda j: j.record.created_at, reverse=True)
        infos = {j.id: self._info(j) for j in live[:limit]}
        for rec in self.registry.list_jobs(limit, status):
            if rec.job_id not in infos and rec.job_id not in self._jobs:
                infos[rec.job_id] = task_info(rec, self.events_url(rec.job_id))
        return sorted(infos.values(), key=lambda t: t.created_at, reverse=True)[:limit]

    def cancel(self, job_id: str) -> TaskInfo:
        """Cancel a job: a queued one ends at once, a running one is cancelled on its worker.

        Idempotent; a finished job is left as it is. The job ends with ``end`` (stop_reason CANCELLED),
        forced after ``cancel_grace_s`` if the worker does not confirm.
        """
        job = self._jobs.get(job_id)
        if job is None:
            return self.info(job_id)
        if job.done or job.cancel_requested:
            return self._info(job)
        job.cancel_requested = True
        if job.state is JobState.QUEUED:
            job.end(StopReason.CANCELLED)
        else:
            self._cancel_on_worker(job)
            asyncio.get_running_loop().call_later(self.settings.cancel_grace_s, self._force_cancel, job)
        return self._info(job)

    def events_url(self, job_id: str) -> str:
        base = (self.settings.public_url or "").rstrip("/")
        return f"{base}/v2/tasks/{job_id}/events"

    def _info(self, job: Job) -> TaskInfo:
        position = None
        if job.state is JobState.QUEUED:
            position = self.queue.find(job.id, job.request.priority)
        elif job.state is JobState.RUNNING:
            job.record.tokens_out = job.tokens_so_far()
        return task_info(
            job.record,
            self.events_url(job.id),
            position,
            cancel_requested=job.cancel_requested,
            failed_attempts=job.attempt_errors,
        )

    # --- scheduling and dispatch -------------------------------------------------------------------

    def _pump(self) -> None:
        """Place as many queued jobs as free slots allow, in queue order."""
        if not len(self.queue) or self._closing:
            return
        decisions, self._picks = plan(
            self._queued_views(), self.fleet.snapshot(), self.settings.policy, self._picks, self.script
        )
        for view, decision in decisions:
            job = self._jobs[view.job_id]
            job.set_decision(decision)
            if decision.worker_id is not None:
                self._dispatch(job, decision.worker_id)

    def _queued_views(self) -> Iterator[JobView]:
        for job_id in self.queue:
            yield self._jobs[job_id].view()

    def _dispatch(self, job: Job, worker_id: str) -> None:
        self.queue.remove(job.id, job.request.priority)
        self.fleet.take(worker_id)
        job.slot = worker_id
        now = time.monotonic()
        rec = job.record
        if job.dispatched_at is None and rec.attempts == 0:
            self.metrics.queue_wait.observe(now - job.queued_at)
            rec.started_at = time.time()
        rec.status = JobState.RUNNING.value
        rec.worker_id = worker_id
        rec.attempts += 1
        # Each attempt has its own id on the worker, so a retry never collides with an earlier
        # attempt the worker may still be winding down.
        job.worker_job_id = job.id if rec.attempts == 1 else f"{job.id}.{rec.attempts}"
        job.dispatched_at = now
        job.last_event_at = now
        entry = self.fleet.get(worker_id)
        attempt: Callable[[], Coroutine[Any, Any, Result]] | str = (
            f"worker {worker_id} left before the job reached it"
        )
        if entry is not None:
            # The request goes out now where a kept-alive connection allows: a burst of submissions
            # reaches the worker as it arrives, not after every client of the burst was answered.
            try:
                attempt = start_attempt(
                    self.session,
                    job,
                    worker_id,
                    entry.reg.uri,
                    entry.reg.token,
                    self.metrics.ttft,
                    self.streams,
                )
            except Exception as exc:  # a request that cannot be made fails this attempt alone
                log.error("job %s could not be sent to worker %s", job.id, worker_id, exc_info=True)
                attempt = f"the job could not be sent to worker {worker_id}: {type(exc).__name__}: {exc}"
        job.task = asyncio.create_task(self._run(job, worker_id, attempt), name=f"rbees-job-{job.id}")

    async def _run(
        self, job: Job, worker_id: str, attempt: Callable[[], Coroutine[Any, Any, Result]] | str
    ) -> None:
        """Run one attempt (or, given a reason, fail it at once) and retry or end the job after it."""
        failure: str | None = None
        try:
            failure = attempt if isinstance(attempt, str) else self._judge(worker_id, await attempt())
        finally:
            self._release_slot(job)
            if failure is not None and not job.done:
                self._retry_or_fail(job, worker_id, failure)
            self._pump()

    def _release_slot(self, job: Job) -> None:
        """Give back the slot a job holds (once): at its terminal event, or when its attempt ends."""
        if job.slot is not None:
            self.fleet.release(job.slot)
            job.slot = None

    def _judge(self, worker_id: str, result: Result) -> str | None:
        """An attempt's outcome: a reason means "retry elsewhere", ``None`` that the job ended (or
        waits again)."""
        if result.worker_error is not None:
            self.fleet.apply([Probe(worker_id, result.worker_error)], time.monotonic())
        if result.outcome is Outcome.BUSY:
            # The worker is busier than counted here (someone else uses it, or a cancelled job is
            # still winding down): hold a slot until its health says otherwise, and wait.
            self.fleet.hold(worker_id)
            return _BUSY
        return result.reason if result.outcome is Outcome.RETRY else None

    def _retry_or_fail(self, job: Job, worker_id: str, reason: str) -> None:
        rec = job.record
        rec.status = JobState.QUEUED.value
        rec.worker_id = None
        job.dispatched_at = None
        if job.cancel_requested:
            job.end(StopReason.CANCELLED)
            return
        if reason == _BUSY:
            rec.attempts -= 1  # not a failure: back to the head of the queue until a slot frees
            self.queue.push_front(job.id, job.request.priority)
            return
        job.exclude.add(worker_id)
        job.attempt_errors.append(reason)
        if rec.attempts > self.settings.max_retries:
            job.fail(
                ErrorCode.WORKER_FAILED,
                f"no worker could start the job after {rec.attempts} attempt(s); last: {reason}",
                retriable=True,
            )
            return
        self.metrics.retries.inc()
        delay = min(
            self.settings.retry_backoff_max_s, self.settings.retry_backoff_s * 2 ** (rec.attempts - 1)
        )
        log.info("job %s: %s; retrying in %.2fs", job.id, reason, delay)
        asyncio.get_running_loop().call_later(delay, self._requeue, job)

    def _requeue(self, job: Job) -> None:
        if job.done or self._closing:
            return
        self.queue.push_front(job.id, job.request.priority)
        self._pump()

    # --- endings ------------------------------------------------------------------------------------

    def _on_done(self, job: Job) -> None:
        """Called once per job, right after its terminal event, whoever appended it."""
        self._active.pop(job.id, None)
        rec = job.record
        if job.dispatched_at is None:
            self.queue.remove(job.id, job.request.priority)
        self.writer.put(rec)
        self.metrics.finished.inc(status=rec.status)
        if rec.tokens_out:
            self.metrics.tokens.inc(rec.tokens_out)
        self._finished[job.id] = time.monotonic()
        self._release_slot(job)
        task = job.task
        if task is not None and not task.done() and not job.relaying and task is not asyncio.current_task():
            # Ended from outside the relay (timeout, forced cancel, shutdown): stop it and the worker,
            # whose slot stays counted as busy until it reports it free.
            task.cancel()
            if job.worker_id is not None:
                self.fleet.hold(job.worker_id)
            if not job.cancel_requested:
                self._cancel_on_worker(job)
        self._pump()

    def _force_cancel(self, job: Job) -> None:
        if not job.done:
            job.end(StopReason.CANCELLED)

    def _cancel_on_worker(self, job: Job) -> None:
        entry = self.fleet.get(job.worker_id) if job.worker_id else None
        if entry is not None:
            self._spawn(
                dispatcher.cancel(
                    self.session, entry.reg.uri, entry.reg.token, job.worker_job_id, _WORKER_CANCEL_TIMEOUT_S
                )
            )

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch(self) -> None:
        while True:
            # Tick fast only while there are jobs to watch; an idle orchestrator wakes once a second.
            await asyncio.sleep(_WATCH_INTERVAL_S if self._active else _IDLE_WATCH_INTERVAL_S)
            self._tick(time.monotonic())

    def _tick(self, now: float) -> None:
        """Each step on its own: one job that fails its check stops neither the others' timeouts
        nor eviction (a traceback at most every 10 s, however often it fails)."""
        steps: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
            (self._time_out, (job, now)) for job in list(self._active.values())
        ]
        for step, args in [*steps, (self._fail_stranded, (now,)), (self._evict, (now,))]:
            try:
                step(*args)
            except Exception:
                if now - self._tick_error_at >= 10.0:
                    self._tick_error_at = now
                    log.error("a watchdog step failed (%s); the others go on", step.__name__, exc_info=True)

    def _time_out(self, job: Job, now: float) -> None:
        clock = Clock(job.queued_at, job.deadline_at, job.dispatched_at, job.last_event_at, job.got_token)
        hit = expired(clock, now, self._limits)
        if hit is not None:
            self.metrics.timeouts.inc(kind=hit.kind)
            log.info("job %s timed out (%s): %s", job.id, hit.kind, hit.message)
            job.fail(ErrorCode.TIMEOUT, hit.message, retriable=True)

    def _fail_stranded(self, now: float) -> None:
        """End the jobs still waiting for a worker when none is left that could take them (all gone
        from the registry, or unreachable for ``no_worker_timeout_s``) instead of at the queue timeout."""
        gone_after = self.settings.no_worker_timeout_s
        if gone_after <= 0 or not len(self.queue):
            return
        waiting = [j for j in self._active.values() if j.dispatched_at is None and not j.done]
        for job, error in stranded_requests(waiting, self.fleet, now, gone_after):
            job.fail(error.code, error.message, retriable=True)

    def _evict(self, now: float) -> None:
        keep, ttl = self.settings.job_retention, self.settings.job_retention_s
        while self._finished:
            job_id, finished_at = next(iter(self._finished.items()))
            if len(self._finished) <= keep and now - finished_at <= ttl:
                break
            self._finished.popitem(last=False)
            self._jobs.pop(job_id, None)
