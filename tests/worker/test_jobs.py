"""The decode loop's stop reasons and events, driven by a scripted engine (no model needed)."""

from __future__ import annotations

from collections.abc import Generator, Sequence

import pytest

from rbees.protocol import (
    ChatMessage,
    EndEvent,
    ErrorEvent,
    ExecuteRequest,
    SamplingParams,
    StopReason,
    TokenEvent,
)
from rbees.protocol.events import Event
from rbees.worker.jobs import Job, run_generation
from rbees.worker.slots import Flag

EOS = 99
VOCAB = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: " STOP", 7: " after"}


class ScriptedEngine:
    """Yields a fixed token script; records how many decode steps ran and whether it was closed."""

    def __init__(self, script: Sequence[int], *, context: int = 1000, fail_at: int | None = None) -> None:
        self.script = list(script)
        self.context = context
        self.fail_at = fail_at
        self.steps = 0
        self.closed = False

    device = "cpu"

    @property
    def context_length(self) -> int:
        return self.context

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({EOS})

    def memory_bytes(self) -> int:
        return 0

    def encode(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> list[int]:
        return [1]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(VOCAB.get(i, "") for i in token_ids)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int
    ) -> Generator[int, None, None]:
        try:
            for token in self.script:
                if self.fail_at is not None and self.steps == self.fail_at:
                    raise RuntimeError("device lost")
                self.steps += 1
                yield token
            while True:
                self.steps += 1
                yield 5
        finally:
            self.closed = True


def _run(engine: ScriptedEngine, cancel_after: int | None = None, **params: object) -> list[Event]:
    request = ExecuteRequest.model_validate({"job_id": "j", "prompt": "x", **params})
    job = Job(job_id="j", request=request, prompt_ids=[1, 2], seed=0)
    events: list[Event] = []

    def emit(event: Event) -> None:
        events.append(event)
        if cancel_after is not None and sum(isinstance(e, TokenEvent) for e in events) >= cancel_after:
            job.cancel.set()

    run_generation(engine, job, emit)
    return events


def _text(events: list[Event]) -> str:
    return "".join(e.t for e in events if isinstance(e, TokenEvent))


def _end(events: list[Event]) -> EndEvent:
    terminal = [e for e in events if isinstance(e, EndEvent | ErrorEvent)]
    assert len(terminal) == 1 and terminal[0] is events[-1], "exactly one terminal event, last"
    assert isinstance(terminal[0], EndEvent)
    return terminal[0]


def test_eos_ends_with_eos_and_is_not_emitted() -> None:
    engine = ScriptedEngine([1, 2, EOS, 3])
    events = _run(engine, max_tokens=50)
    end = _end(events)
    assert end.stop_reason is StopReason.EOS
    assert _text(events) == "Hello"
    assert end.tokens_out == 2 and end.tokens_in == 2
    assert engine.closed


def test_max_tokens_ends_with_max_tokens() -> None:
    events = _run(ScriptedEngine([1, 2, 3, 4]), max_tokens=3)
    end = _end(events)
    assert end.stop_reason is StopReason.MAX_TOKENS and end.tokens_out == 3
    assert _text(events) == "Hello wor"


def test_context_window_caps_generation() -> None:
    events = _run(ScriptedEngine([1, 2, 3, 4], context=4), max_tokens=50)
    end = _end(events)
    assert end.stop_reason is StopReason.MAX_TOKENS and end.tokens_out == 2


def test_stop_sequence_ends_generation_and_is_not_emitted() -> None:
    events = _run(ScriptedEngine([1, 2, 6, 7]), max_tokens=50, stop=[" ST"])
    end = _end(events)
    assert end.stop_reason is StopReason.STOP_SEQUENCE
    assert end.stop_sequence_matched == " ST"
    assert _text(events) == "Hello"


def test_token_indices_count_events_from_zero() -> None:
    events = _run(ScriptedEngine([1, 2, 3]), max_tokens=3)
    assert [e.i for e in events if isinstance(e, TokenEvent)] == [0, 1, 2]


def test_cancel_stops_within_one_step() -> None:
    engine = ScriptedEngine([1, 2, 3, 4])
    events = _run(engine, cancel_after=2, max_tokens=50)
    end = _end(events)
    assert end.stop_reason is StopReason.CANCELLED
    assert end.tokens_out == 2 and engine.steps == 2
    assert engine.closed


def test_cancel_before_start_generates_nothing() -> None:
    engine = ScriptedEngine([1, 2])
    request = ExecuteRequest(job_id="j", prompt="x")
    job = Job(job_id="j", request=request, prompt_ids=[1], seed=0, cancel=Flag())
    job.cancel.set()
    events: list[Event] = []
    run_generation(engine, job, events.append)
    assert _end(events).stop_reason is StopReason.CANCELLED and engine.steps == 0


def test_failure_inside_the_model_is_one_error_event() -> None:
    engine = ScriptedEngine([1, 2, 3], fail_at=2)
    events = _run(engine, max_tokens=50)
    assert isinstance(events[-1], ErrorEvent)
    assert "device lost" in events[-1].message
    assert not any(isinstance(e, EndEvent) for e in events)
    assert _text(events) == "Hello"
    assert engine.closed


@pytest.mark.parametrize("stop", [["!"], ["ld!"]])
def test_stop_in_the_last_allowed_token_wins_over_max_tokens(stop: list[str]) -> None:
    events = _run(ScriptedEngine([1, 2, 3, 4, 5]), max_tokens=5, stop=stop)
    end = _end(events)
    assert end.stop_reason is StopReason.STOP_SEQUENCE
    assert "!" not in _text(events)
