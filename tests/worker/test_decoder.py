"""The worker's one decode thread: turns among jobs, newcomers first, exits, stop."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Generator, Sequence

import pytest

from rbees.protocol import EndEvent, ErrorEvent, ExecuteRequest, SamplingParams, StopReason, TokenEvent
from rbees.protocol.events import Event
from rbees.worker import decoder
from rbees.worker.decoder import DecodeLoop, gather_window, refill_window
from rbees.worker.jobs import Generation, Job
from tests.worker.test_jobs import ScriptedEngine


class RecordingEngine(ScriptedEngine):
    """Every decode step appends the prompt's first id (the job's name) to a shared trace.

    ``gate`` (when given) blocks the first step of the job named 0 until it is set, so a test
    can line up other jobs behind it."""

    def __init__(self, trace: list[int], gate: threading.Event | None = None) -> None:
        super().__init__([], context=1_000_000)
        self.trace = trace
        self.gate = gate
        self.lock = threading.Lock()

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int
    ) -> Generator[int, None, None]:
        name = prompt_ids[0]
        while True:
            if name == 0 and self.gate is not None:
                self.gate.wait(10)
            with self.lock:
                self.trace.append(name)
            yield 1


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.exits = 0
        self.done = threading.Event()

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def exited(self) -> None:
        self.exits += 1
        self.done.set()


def _generation(engine: ScriptedEngine, name: int, max_tokens: int, sink: Sink) -> Generation:
    request = ExecuteRequest(job_id=f"job-{name}", prompt="x", max_tokens=max_tokens)
    job = Job(job_id=request.job_id, request=request, prompt_ids=[name], seed=0)
    return Generation(engine, job, sink.emit)


def test_running_jobs_take_turns_one_step_each() -> None:
    trace: list[int] = []
    gate = threading.Event()
    engine = RecordingEngine(trace, gate)
    loop = DecodeLoop()
    sinks = [Sink() for _ in range(3)]
    try:
        # Job 0's first step waits on the gate, so jobs 1 and 2 are queued before any turn is taken.
        loop.submit(_generation(engine, 0, 4, sinks[0]), sinks[0].exited)
        loop.submit(_generation(engine, 1, 4, sinks[1]), sinks[1].exited)
        loop.submit(_generation(engine, 2, 4, sinks[2]), sinks[2].exited)
        gate.set()
        assert all(s.done.wait(10) for s in sinks)
    finally:
        loop.stop()
    # Newcomers get their first step first, then the three take turns.
    assert trace == [0, 1, 2] * 4
    for sink in sinks:
        assert sink.exits == 1
        tokens = [e for e in sink.events if isinstance(e, TokenEvent)]
        end = sink.events[-1]
        assert len(tokens) == 4
        assert isinstance(end, EndEvent) and end.stop_reason is StopReason.MAX_TOKENS


def test_what_a_round_of_turns_made_goes_out_before_the_next_round_and_before_idling() -> None:
    trace: list[int] = []
    gate = threading.Event()
    engine = RecordingEngine(trace, gate)
    flushed = -1

    def on_round() -> None:
        with engine.lock:
            trace.append(flushed)

    loop = DecodeLoop(on_round=on_round)
    sinks = [Sink() for _ in range(3)]
    try:
        for name, sink in enumerate(sinks):
            loop.submit(_generation(engine, name, 6, sink), sink.exited)
        gate.set()
        assert all(s.done.wait(10) for s in sinks)
        deadline = time.monotonic() + 5
        while trace[-1] != flushed and time.monotonic() < deadline:  # the loop goes idle
            time.sleep(0.001)
    finally:
        loop.stop()
    assert trace[-1] == flushed  # nothing is left unwritten while the loop waits for work
    segments: list[list[int]] = [[]]
    for name in trace:
        if name == flushed:
            segments.append([])
        else:
            segments[-1].append(name)
    steps = [seg for seg in segments if seg]
    # Each newcomer's first step is flushed at once; no job steps twice between two flushes (a job's
    # token never waits for its next one), and once all three run, a flush comes once per round of
    # three turns, not after every turn.
    assert steps[:3] == [[0], [1], [2]], segments
    assert all(len(set(seg)) == len(seg) for seg in steps), segments
    assert sum(len(seg) == 3 for seg in steps) >= 3, segments
    assert sum(map(len, steps)) == 18 and len(steps) <= 9, segments


def test_a_newcomer_gets_its_first_step_before_the_running_jobs_continue() -> None:
    trace: list[int] = []
    engine = RecordingEngine(trace)
    loop = DecodeLoop()
    long_job, newcomer = Sink(), Sink()
    endless = _generation(engine, 0, 32768, long_job)
    try:
        loop.submit(endless, long_job.exited)
        while len(trace) < 20:  # job 0 is decoding
            threading.Event().wait(0.001)
        submitted_at = len(trace)
        loop.submit(_generation(engine, 7, 1, newcomer), newcomer.exited)
        assert newcomer.done.wait(10)
        endless.job.cancel.set()
        assert long_job.done.wait(10)
    finally:
        loop.stop()
    assert trace.count(7) == 1
    # At most the step of job 0 under way (and one whose check for newcomers had just passed)
    # went before the newcomer's first step, and job 0 went on afterwards.
    assert submitted_at <= trace.index(7) <= submitted_at + 2
    assert 0 in trace[trace.index(7) + 1 :]
    assert isinstance(newcomer.events[-1], EndEvent)


def test_cancel_is_seen_at_the_jobs_next_turn_and_others_go_on() -> None:
    trace: list[int] = []
    engine = RecordingEngine(trace)
    loop = DecodeLoop()
    cancelled, other = Sink(), Sink()
    try:
        gen = _generation(engine, 3, 1000, cancelled)
        loop.submit(gen, cancelled.exited)
        loop.submit(_generation(engine, 4, 50, other), other.exited)
        while trace.count(3) < 5:
            threading.Event().wait(0.001)
        gen.job.cancel.set()
        assert cancelled.done.wait(10) and other.done.wait(10)
    finally:
        loop.stop()
    end = cancelled.events[-1]
    assert isinstance(end, EndEvent) and end.stop_reason is StopReason.CANCELLED
    assert isinstance(other.events[-1], EndEvent) and other.events[-1].tokens_out == 50


def test_a_failing_model_ends_only_its_own_job() -> None:
    loop = DecodeLoop()
    broken, fine = Sink(), Sink()
    try:
        loop.submit(_generation(ScriptedEngine([1, 2, 3], fail_at=1), 1, 10, broken), broken.exited)
        loop.submit(_generation(ScriptedEngine([1, 2, 3, 4]), 2, 3, fine), fine.exited)
        assert broken.done.wait(10) and fine.done.wait(10)
    finally:
        loop.stop()
    assert isinstance(broken.events[-1], ErrorEvent)
    assert isinstance(fine.events[-1], EndEvent) and fine.events[-1].tokens_out == 3


def test_stop_abandons_running_jobs_and_frees_their_caches() -> None:
    gate = threading.Event()

    class Slow(ScriptedEngine):
        def generate(
            self, prompt_ids: Sequence[int], params: SamplingParams, seed: int
        ) -> Generator[int, None, None]:
            try:
                while True:
                    gate.wait(0.01)
                    yield 1
            finally:
                self.closed = True

    slow = Slow([])
    loop = DecodeLoop()
    sink = Sink()
    loop.submit(_generation(slow, 1, 10_000, sink), sink.exited)
    while not sink.events:
        threading.Event().wait(0.001)
    loop.stop()
    assert sink.exits == 1 and slow.closed
    assert not any(isinstance(e, EndEvent | ErrorEvent) for e in sink.events)


def _nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
@pytest.mark.parametrize("nice", [0, 3])
def test_the_decode_thread_runs_nice_steps_below_its_process(nice: int) -> None:
    seen: list[int] = []

    class Noting(ScriptedEngine):
        def generate(
            self, prompt_ids: Sequence[int], params: SamplingParams, seed: int
        ) -> Generator[int, None, None]:
            seen.append(_nice_of_this_thread())
            yield 1

    base = _nice_of_this_thread()
    loop = DecodeLoop(nice=nice)
    sink = Sink()
    try:
        loop.submit(_generation(Noting([]), 1, 1, sink), sink.exited)
        assert sink.done.wait(10)
    finally:
        loop.stop()
    assert seen == [min(19, base + nice)]
    assert _nice_of_this_thread() == base  # the submitting thread keeps its own


def _grows(trace: list[int], within_s: float) -> bool:
    before = len(trace)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if len(trace) > before:
            return True
        threading.Event().wait(0.001)
    return False


def test_steps_wait_while_a_request_is_admitted_and_the_newcomer_goes_first() -> None:
    trace: list[int] = []
    engine = RecordingEngine(trace)
    loop = DecodeLoop(admission_wait_s=30)
    running, newcomer = Sink(), Sink()
    endless = _generation(engine, 0, 32768, running)
    try:
        loop.submit(endless, running.exited)
        assert _grows(trace, 10)
        with loop.admitting():
            _grows(trace, 0.05)  # the step under way (if any) ends; then no further one starts
            held_at = len(trace)
            assert not _grows(trace, 0.3)
            loop.submit(_generation(engine, 7, 1, newcomer), newcomer.exited)
            assert not _grows(trace, 0.1)  # admitted, but the admission is not over yet
        assert newcomer.done.wait(10)
        assert trace[held_at] == 7  # once it is over, the newcomer's first step comes first
        assert _grows(trace, 10)  # and the running job goes on
        endless.job.cancel.set()
        assert running.done.wait(10)
    finally:
        loop.stop()


def test_an_admission_that_does_not_end_holds_steps_back_only_for_a_while() -> None:
    trace: list[int] = []
    engine = RecordingEngine(trace)
    loop = DecodeLoop(admission_wait_s=0.02)
    sink = Sink()
    endless = _generation(engine, 0, 32768, sink)
    try:
        loop.submit(endless, sink.exited)
        assert _grows(trace, 10)
        with loop.admitting():
            start = len(trace)
            threading.Event().wait(0.5)
            assert len(trace) - start >= 3  # a step at least every 20 ms wait, not a stall
        endless.job.cancel.set()
        assert sink.done.wait(10)
    finally:
        loop.stop()


class BatchingEngine(RecordingEngine):
    """Records which jobs (by name) each batched prefill was given."""

    def __init__(self, trace: list[int], gate: threading.Event) -> None:
        super().__init__(trace, gate)
        self.batches: list[list[int]] = []
        self.first_step = threading.Event()  # job 0's first step is under way

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int
    ) -> Generator[int, None, None]:
        if prompt_ids[0] == 0:
            self.first_step.set()
        yield from super().generate(prompt_ids, params, seed)

    def generate_batch(
        self, requests: Sequence[tuple[Sequence[int], SamplingParams, int]]
    ) -> list[Generator[int, None, None]]:
        self.batches.append([prompt[0] for prompt, _, _ in requests])
        return [self.generate(*r) for r in requests]


def test_newcomers_that_arrive_together_are_prefilled_in_one_batch() -> None:
    trace: list[int] = []
    gate = threading.Event()
    engine = BatchingEngine(trace, gate)
    loop = DecodeLoop(prefill_tokens=4096)
    sinks = [Sink() for _ in range(4)]
    try:
        # Job 0's first step waits on the gate; jobs 1-3 arrive meanwhile, so they come in together.
        loop.submit(_generation(engine, 0, 3, sinks[0]), sinks[0].exited)
        assert engine.first_step.wait(10)
        for name in (1, 2, 3):
            loop.submit(_generation(engine, name, 3, sinks[name]), sinks[name].exited)
        gate.set()
        assert all(s.done.wait(10) for s in sinks)
    finally:
        loop.stop()
    assert engine.batches == [[1, 2, 3]]
    assert all(isinstance(s.events[-1], EndEvent) and s.events[-1].tokens_out == 3 for s in sinks)


def test_without_a_prefill_budget_newcomers_are_not_batched() -> None:
    trace: list[int] = []
    gate = threading.Event()
    gate.set()
    engine = BatchingEngine(trace, gate)
    loop = DecodeLoop(prefill_tokens=0)
    sinks = [Sink() for _ in range(3)]
    try:
        for name, sink in enumerate(sinks):
            loop.submit(_generation(engine, name, 2, sink), sink.exited)
        assert all(s.done.wait(10) for s in sinks)
    finally:
        loop.stop()
    assert engine.batches == []


@pytest.mark.parametrize(
    ("prefill_s", "share", "window"),
    [
        (0.032, 0.125, 0.004),  # a GPU's pass: an eighth of it
        (0.200, 0.125, 0.005),  # at most 5 ms
        (0.032, 0.0, 0.0),  # a CPU worker does not wait
        (0.003, 0.125, 0.0),  # nor where a pass is cheap: under half a millisecond is no window
        (0.0, 0.125, 0.0),  # nothing measured yet
    ],
)
def test_refill_window_is_a_share_of_the_last_prefill(prefill_s: float, share: float, window: float) -> None:
    assert refill_window(prefill_s, share) == pytest.approx(window)


@pytest.mark.parametrize(
    ("prefill_s", "share", "window"),
    [
        (0.032, 0.5, 0.016),  # a GPU's prefill: half of it
        (0.200, 0.5, 0.020),  # at most 20 ms
        (0.032, 0.0, 0.0),  # a CPU worker gathers nothing
        (0.0015, 0.5, 0.0),  # nor where a prefill is cheap: under a millisecond is no window
        (0.0, 0.5, 0.0),  # nothing measured yet
    ],
)
def test_gather_window_is_a_share_of_the_last_prefill(prefill_s: float, share: float, window: float) -> None:
    assert gather_window(prefill_s, share) == pytest.approx(window)


@pytest.fixture
def slow_gathering(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gather windows and gaps long enough that a test's arrival times cannot miss them."""
    monkeypatch.setattr(decoder, "GATHER_CAP_S", 2.0)
    monkeypatch.setattr(decoder, "GATHER_GAP_S", 0.3)


@pytest.mark.parametrize("share", [1.0, 0.0])
def test_an_idle_worker_gathers_a_spread_burst_into_one_prefill(share: float, slow_gathering: None) -> None:
    trace: list[int] = []
    gate = threading.Event()
    gate.set()
    engine = BatchingEngine(trace, gate)
    loop = DecodeLoop(prefill_tokens=4096, gather_share=share)
    loop.prefill_s = 2.0  # as if its last prefill took 2 s: a window of 2 s, gaps of 0.5 s
    sinks = [Sink() for _ in range(4)]
    try:
        for name in (1, 2, 3):  # one every 50 ms: a burst spread out
            loop.submit(_generation(engine, name, 2, sinks[name]), sinks[name].exited)
            threading.Event().wait(0.05)
        assert all(s.done.wait(10) for s in sinks[1:])
    finally:
        loop.stop()
    if share:
        assert engine.batches == [[1, 2, 3]]
    else:  # the first starts at once, alone; the other two come in during its steps
        assert [1, 2, 3] not in engine.batches and trace[0] == 1


def test_a_lone_request_waits_only_for_a_second_one_to_arrive(slow_gathering: None) -> None:
    trace: list[int] = []
    engine = RecordingEngine(trace)
    loop = DecodeLoop(prefill_tokens=4096, gather_share=1.0)
    loop.prefill_s = 2.0  # a window of 2 s; but no second request comes within the gap (0.3 s)
    sink = Sink()
    try:
        started = time.monotonic()
        loop.submit(_generation(engine, 1, 1, sink), sink.exited)
        assert sink.done.wait(10)
        waited = time.monotonic() - started
    finally:
        loop.stop()
    assert 0.25 < waited < 1.5


class SlowPrefillEngine(RecordingEngine):
    """Each job's first step (its prefill) takes 20 ms, as a pass does on a GPU."""

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int
    ) -> Generator[int, None, None]:
        time.sleep(0.02)
        yield from super().generate(prompt_ids, params, seed)


@pytest.mark.parametrize("share", [25.0, 0.0])
def test_when_a_job_ends_the_others_wait_a_moment_for_the_next(
    share: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decoder, "REFILL_CAP_S", 2.0)  # long enough that the test's timing cannot miss it
    trace: list[int] = []
    engine = SlowPrefillEngine(trace)
    loop = DecodeLoop(refill_share=share)  # two first steps of 20 ms: a window of min(2 s, 25 x 40 ms)
    short, endless, replacement = Sink(), Sink(), Sink()
    runner = _generation(engine, 0, 32768, endless)
    try:
        loop.submit(_generation(engine, 1, 3, short), short.exited)
        loop.submit(runner, endless.exited)
        assert short.done.wait(10)
        held = len(trace)
        threading.Event().wait(0.05)  # the next request comes 50 ms after the job ended
        if share:
            assert len(trace) == held  # the running job waited for it
        loop.submit(_generation(engine, 2, 1, replacement), replacement.exited)
        assert replacement.done.wait(10)
        assert _grows(trace, 10)  # and then goes on
        runner.job.cancel.set()
        assert endless.done.wait(10)
    finally:
        loop.stop()
    steps_before = trace[held:].index(2)
    assert steps_before == 0 if share else steps_before > 0
