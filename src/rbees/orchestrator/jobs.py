"""One job: its state, its numbered event log and the fan-out to any number of followers.

Events are kept as the JSON text the worker sent (plus the SSE frame built once), so relaying never
re-serialises a token. A job takes exactly one terminal event (``end`` or ``error``); anything offered
after it is dropped. Followers resume from any event id (``Last-Event-ID``), and a finished job replays.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from rbees.httpd import LastFrame
from rbees.orchestrator.event_frames import EventFrames, sse_frame
from rbees.orchestrator.registry import JobRecord
from rbees.orchestrator.scheduler import Decision, JobView
from rbees.protocol import ErrorCode, Event, StopReason, TaskRequest, parse_event


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
TERMINAL_TYPES = frozenset({"end", "error"})


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One event of a job: its id, its ``type`` and its JSON text exactly as relayed."""

    id: int
    type: str
    data: str
    frame: bytes

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def parse(self) -> Event:
        return parse_event(self.data)

    def fields(self) -> dict[str, Any]:
        value = json.loads(self.data)
        return value if isinstance(value, dict) else {}


def decode_ms(started_at: float | None, ended_at: float | None) -> int:
    """An ``end`` the orchestrator writes itself (a forced cancel, a replay from the record): the
    milliseconds from the job's first dispatch to its end, 0 for a job that never reached a worker."""
    if started_at is None or ended_at is None:
        return 0
    return max(0, round((ended_at - started_at) * 1000))


def dumps(value: dict[str, Any]) -> str:
    """Compact JSON, as the workers write it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# Takes an event as it is appended; False: it did not, and wants no more.
Pusher = Callable[["JobEvent"], bool]


class EventLog:
    """Numbered events with exactly one terminal event, followed by any number of readers.

    A reader that caught up waits on a future of its own, resolved by the next append: an event costs
    nothing for waking when nobody waits, and a reader that is cancelled leaves the others alone.
    """

    def __init__(self) -> None:
        self._frames = EventFrames()  # kept out of the garbage collector's walks (see event_frames)
        self.closed = False
        self._waiters: list[asyncio.Future[None]] = []
        self._pushers: list[Pusher] = []

    def __len__(self) -> int:
        return len(self._frames)

    def event(self, index: int) -> JobEvent:
        """The event at ``index`` (its id is ``index + 1``, but in a replayed log)."""
        frames = self._frames
        event_id = frames.first_id + index
        return JobEvent(event_id, frames.type_at(index), frames.data_at(index), frames.frame_at(index))

    @property
    def events(self) -> list[JobEvent]:
        """Every event so far, in order."""
        return [self.event(index) for index in range(len(self._frames))]

    def last_of_type(self, event_type: str) -> JobEvent | None:
        """The latest event of ``event_type``, if any."""
        index = self._frames.last_index_of(event_type)
        return None if index is None else self.event(index)

    def append(self, event_type: str, data: str) -> JobEvent | None:
        if self.closed:
            return None
        event_id = self._frames.first_id + len(self._frames)
        event = JobEvent(event_id, event_type, data, sse_frame(event_id, data))
        self._frames.add(event_type, event.frame)
        self.closed = event_type in TERMINAL_TYPES
        if self._pushers:
            self._pushers = [push for push in self._pushers if push(event)]
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        return event

    def push_to(self, push: Pusher) -> Callable[[], None]:
        """Hand every event appended from now on to ``push`` as it is appended, until it returns
        False (it did not take that event) or the returned function detaches it."""
        self._pushers.append(push)

        def detach() -> None:
            if push in self._pushers:
                self._pushers.remove(push)

        return detach

    def _wait(self) -> asyncio.Future[None]:
        """A future of the calling reader's own, resolved by the next append."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    async def follow(self, last_id: int = 0) -> AsyncIterator[JobEvent]:
        """Every event after ``last_id``, live, until (and including) the terminal one."""
        index = max(0, last_id)
        while True:
            while index < len(self._frames):
                event = self.event(index)
                index += 1
                yield event
                if event.terminal:
                    return
            if self.closed:
                return
            await self._wait()

    def frames_after(self, index: int) -> tuple[bytes, int, bool] | None:
        """The SSE bytes of every event after the first ``index`` in one piece, the index reached and
        whether its last event is the terminal one; None while there are none."""
        end = len(self._frames)
        if index >= end:
            return None
        return self._frames.frames(index, end), end, self._frames.type_at(end - 1) in TERMINAL_TYPES

    async def follow_frames(self, last_id: int = 0) -> AsyncIterator[bytes]:
        """Like ``follow`` but as SSE bytes, with every event already waiting sent in one piece."""
        index = max(0, last_id)
        while True:
            batch = self.frames_after(index)
            if batch is not None:
                frames, index, terminal = batch
                if terminal:
                    yield LastFrame(frames)
                    return
                yield frames
                continue
            if self.closed:
                return
            await self._wait()

    async def wait_closed(self) -> None:
        while not self.closed:
            await self._wait()

    @classmethod
    def replay_of(cls, rec: JobRecord, after_id: int = 0) -> EventLog:
        """The terminal event of a job known only from its durable record (after a restart, or once
        it left memory), as the one event of the log.

        Its earlier events are gone, so whatever a client already saw (``after_id``, its
        ``Last-Event-ID``), it gets the terminal event, numbered ``after_id + 1``: a stream resumed
        across a restart still learns how its job ended. Follow it from index 0.
        """
        log = cls()
        if rec.status in (JobState.COMPLETED, JobState.CANCELLED) and rec.stop_reason is not None:
            body: dict[str, Any] = {
                "type": "end",
                "tokens_out": rec.tokens_out,
                "decode_time_ms": decode_ms(rec.started_at, rec.finished_at),
                "stop_reason": rec.stop_reason,
            }
            if rec.tokens_in is not None:
                body["tokens_in"] = rec.tokens_in
        else:
            body = {
                "type": "error",
                "code": rec.error_code or ErrorCode.INTERNAL.value,
                "message": rec.error_message or f"job is {rec.status}",
                "retriable": False,
            }
        data = dumps(body)
        event_id = max(0, after_id) + 1
        log._frames = EventFrames(first_id=event_id)
        log._frames.add(body["type"], sse_frame(event_id, data))
        log.closed = True
        return log


class Job:
    """A job of the orchestrator: the request, its durable record and its event log.

    ``on_done`` is called once, right after the terminal event is appended, whoever appended it.
    """

    def __init__(
        self,
        job_id: str,
        request: TaskRequest,
        on_done: Callable[[Job], None] | None = None,
        now: float | None = None,
    ) -> None:
        self.id = job_id
        self.request = request
        self.record = JobRecord(
            job_id=job_id,
            model=request.model,
            priority=request.priority.value,
            status=JobState.QUEUED.value,
            created_at=time.time() if now is None else now,
        )
        self.log = EventLog()
        self.exclude: set[str] = set()
        self.decision: Decision | None = None
        self.queued_at = time.monotonic()
        self.deadline_at: float | None = None
        self.dispatched_at: float | None = None
        self.last_event_at: float | None = None
        self.got_token = False
        self.cancel_requested = False
        self.accepted_position = 0
        self.attempt_errors: list[str] = []
        self.task: asyncio.Task[None] | None = None
        self.slot: str | None = None  # the worker whose slot this job holds
        self.worker_job_id = job_id  # the id of the current attempt on its worker
        self.params_json: bytes | None = None  # the sampling fields as JSON, made at first dispatch
        # The seed a worker chose and reported in ``started`` when the request had none: a retry
        # before the first token runs with it, so the seed the client was told stays the one used.
        self.chosen_seed: int | None = None
        # True while the relay itself appends a worker's event (its terminal event ends the job from
        # inside the relay, which must then not be cancelled as if the job ended elsewhere).
        self.relaying = False
        self._on_done = on_done

    @property
    def state(self) -> JobState:
        return JobState(self.record.status)

    @property
    def done(self) -> bool:
        return self.log.closed

    @property
    def worker_id(self) -> str | None:
        return self.record.worker_id

    def view(self) -> JobView:
        placement = self.request.placement
        return JobView(
            job_id=self.id,
            model=self.request.model,
            pin_worker=placement.worker if placement else None,
            pin_pool=placement.pool if placement else None,
            exclude=frozenset(self.exclude),
        )

    def events(self, last_id: int = 0) -> AsyncIterator[JobEvent]:
        """Follow the job: every event after ``last_id`` until the terminal one, live."""
        return self.log.follow(last_id)

    async def wait_done(self) -> None:
        await self.log.wait_closed()

    # --- appending ----------------------------------------------------------------------------------

    def append(self, event_type: str, data: str) -> JobEvent | None:
        """Add one event (its JSON text); ``None`` when the job already has its terminal event."""
        event = self.log.append(event_type, data)
        if event is not None and event.terminal:
            self._finish(event)
            if self._on_done is not None:
                self._on_done(self)
        return event

    def tokens_so_far(self) -> int:
        """Tokens generated so far, from the index of the last token event (tokens are not counted one
        by one on the relay path, and one event may carry several tokens)."""
        event = self.log.last_of_type("token")
        index = event.fields().get("i") if event is not None else None
        return index + 1 if isinstance(index, int) else 0

    def end(self, stop_reason: StopReason, **extra: Any) -> JobEvent | None:
        body = {
            "type": "end",
            "tokens_out": self.tokens_so_far(),
            "decode_time_ms": decode_ms(self.record.started_at, time.time()),
            "stop_reason": stop_reason.value,
            **extra,
        }
        if self.record.tokens_in is not None:
            body.setdefault("tokens_in", self.record.tokens_in)
        return self.append("end", dumps(body))

    def fail(self, code: ErrorCode, message: str, retriable: bool) -> JobEvent | None:
        body = {"type": "error", "code": code.value, "message": message, "retriable": retriable}
        return self.append("error", dumps(body))

    def _finish(self, event: JobEvent) -> None:
        rec = self.record
        rec.finished_at = time.time()
        body = event.fields()
        if event.type == "end":
            rec.stop_reason = str(body.get("stop_reason", StopReason.ERROR.value))
            if isinstance(body.get("tokens_out"), int):
                rec.tokens_out = body["tokens_out"]
            if isinstance(body.get("tokens_in"), int):
                rec.tokens_in = body["tokens_in"]
            cancelled = rec.stop_reason == StopReason.CANCELLED.value
            rec.status = (JobState.CANCELLED if cancelled else JobState.COMPLETED).value
        else:
            rec.tokens_out = self.tokens_so_far()
            rec.error_code = str(body.get("code", ErrorCode.INTERNAL.value))
            rec.error_message = str(body.get("message", ""))
            cancelled = rec.error_code == ErrorCode.CANCELLED.value
            rec.status = (JobState.CANCELLED if cancelled else JobState.FAILED).value

    def set_decision(self, decision: Decision) -> None:
        self.decision = decision
        self.record.decision = decision_dict(decision)


def decision_dict(decision: Decision) -> dict[str, Any]:
    return {
        "policy": decision.policy,
        "worker_id": decision.worker_id,
        "wait_reason": decision.wait_reason,
        "reasons": dict(decision.reasons),
    }


class TaskError(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: str
    message: str


class TaskInfo(BaseModel):
    """``GET /v2/tasks/{id}``."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    status: str
    model: str
    priority: str
    worker_id: str | None = None
    queue_position: int | None = None
    attempts: int = 0
    tokens_in: int | None = None
    tokens_out: int = 0
    stop_reason: str | None = None
    error: TaskError | None = None
    decision: dict[str, Any] | None = None
    created_at: str
    started_at: str | None = None
    first_token_at: str | None = None
    finished_at: str | None = None
    cancel_requested: bool = False
    failed_attempts: list[str] = []
    events_url: str


def task_info(
    rec: JobRecord,
    events_url: str,
    queue_position: int | None = None,
    *,
    cancel_requested: bool = False,
    failed_attempts: list[str] | None = None,
) -> TaskInfo:
    error = None
    if rec.error_code is not None:
        error = TaskError(code=rec.error_code, message=rec.error_message or "")
    return TaskInfo(
        job_id=rec.job_id,
        status=rec.status,
        model=rec.model,
        priority=rec.priority,
        worker_id=rec.worker_id,
        queue_position=queue_position,
        attempts=rec.attempts,
        tokens_in=rec.tokens_in,
        tokens_out=rec.tokens_out,
        stop_reason=rec.stop_reason,
        error=error,
        decision=rec.decision,
        created_at=_iso(rec.created_at) or "",
        started_at=_iso(rec.started_at),
        first_token_at=_iso(rec.first_token_at),
        finished_at=_iso(rec.finished_at),
        cancel_requested=cancel_requested,
        failed_attempts=list(failed_attempts or ()),
        events_url=events_url,
    )


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
