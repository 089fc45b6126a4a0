"""Which timeout, if any, a job has run into: a pure function of its timestamps (monotonic seconds).

A limit of 0 is off. The total deadline is the tighter of the configured one and the request's
``deadline_ms``; it runs from acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    queue_s: float = 0.0
    first_token_s: float = 0.0
    silence_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Clock:
    """A job's timestamps as the watchdog sees them."""

    queued_at: float
    deadline_at: float | None
    dispatched_at: float | None
    last_event_at: float | None
    got_token: bool


@dataclass(frozen=True, slots=True)
class Expired:
    kind: str
    message: str


def expired(clock: Clock, now: float, limits: Limits) -> Expired | None:
    if clock.deadline_at is not None and now >= clock.deadline_at:
        total = clock.deadline_at - clock.queued_at
        return Expired("deadline", f"the job's deadline of {total:g}s passed")
    if clock.dispatched_at is None:
        if limits.queue_s and now - clock.queued_at >= limits.queue_s:
            return Expired("queue", f"waited {limits.queue_s:g}s in the queue without a free worker")
        return None
    if not clock.got_token:
        if limits.first_token_s and now - clock.dispatched_at >= limits.first_token_s:
            return Expired("first_token", f"no first token within {limits.first_token_s:g}s of dispatch")
        return None
    last = clock.last_event_at if clock.last_event_at is not None else clock.dispatched_at
    if limits.silence_s and now - last >= limits.silence_s:
        return Expired("silence", f"the worker sent nothing for {limits.silence_s:g}s")
    return None


def deadline_at(queued_at: float, configured_s: float, requested_ms: int | None) -> float | None:
    spans = [s for s in (configured_s, (requested_ms or 0) / 1000) if s > 0]
    return queued_at + min(spans) if spans else None
