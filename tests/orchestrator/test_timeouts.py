"""Which timeout a job hits, as a pure function of its timestamps."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rbees.orchestrator.timeouts import Clock, Limits, deadline_at, expired

LIMITS = Limits(queue_s=10, first_token_s=5, silence_s=2)


BASE = Clock(queued_at=100.0, deadline_at=None, dispatched_at=None, last_event_at=None, got_token=False)


def clock(**changes: Any) -> Clock:
    return replace(BASE, **changes)


def test_queue_timeout() -> None:
    assert expired(clock(), 109.9, LIMITS) is None
    hit = expired(clock(), 110.0, LIMITS)
    assert hit is not None and hit.kind == "queue"


def test_first_token_timeout_runs_from_dispatch() -> None:
    c = clock(dispatched_at=108.0, last_event_at=108.5)
    assert expired(c, 112.9, LIMITS) is None
    hit = expired(c, 113.0, LIMITS)
    assert hit is not None and hit.kind == "first_token"


def test_silence_after_tokens() -> None:
    c = clock(dispatched_at=100.0, last_event_at=150.0, got_token=True)
    assert expired(c, 151.9, LIMITS) is None
    hit = expired(c, 152.0, LIMITS)
    assert hit is not None and hit.kind == "silence"


def test_deadline_wins_over_everything() -> None:
    c = clock(deadline_at=103.0, dispatched_at=101.0, last_event_at=102.9, got_token=True)
    hit = expired(c, 103.0, LIMITS)
    assert hit is not None and hit.kind == "deadline"


def test_zero_disables() -> None:
    assert expired(clock(), 10_000.0, Limits()) is None


def test_deadline_is_the_tighter_of_config_and_request() -> None:
    assert deadline_at(100.0, 60.0, 5000) == 105.0
    assert deadline_at(100.0, 3.0, 5000) == 103.0
    assert deadline_at(100.0, 0.0, None) is None
    assert deadline_at(100.0, 0.0, 2000) == 102.0
