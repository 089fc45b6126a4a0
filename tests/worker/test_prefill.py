"""Batched prefill: prompts that arrive together share one forward pass and decode as they would alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbees.protocol import EndEvent, ErrorEvent, ExecuteRequest, SamplingParams, TokenEvent
from rbees.protocol.events import Event
from rbees.worker.engines.transformers_engine import TransformersEngine
from rbees.worker.jobs import Generation, Job
from rbees.worker.modelfiles import inspect_model_path
from rbees.worker.prefill import prefill_groups, prefill_together
from tests.support.tiny_models import build_tiny_model

PROMPTS = [
    "Once upon a time",
    "Hello",
    "The quick brown fox jumps over the lazy dog, and then it ran all the way home",
    "def add(a, b):",
    "A",
    "Zürich, São Paulo and Kraków",
]


@pytest.mark.parametrize(
    ("lengths", "budget", "groups"),
    [
        ([], 100, []),
        ([5], 100, [[0]]),
        ([5, 5, 5, 5], 100, [[0, 1, 2, 3]]),
        ([5, 5, 5, 5], 10, [[0, 1], [2, 3]]),
        # Shortest first, so short prompts are not padded to long ones.
        ([30, 2, 30, 3], 60, [[1, 3], [0, 2]]),
        ([30, 2, 30, 3], 1000, [[1, 3, 0, 2]]),
        # A prompt longer than the budget goes alone; so does one that no other fits beside.
        ([500, 4, 4], 100, [[1, 2], [0]]),
        ([60, 60], 100, [[0], [1]]),
        ([3, 3, 3], 9, [[0, 1, 2]]),
    ],
)
def test_prefill_groups(lengths: list[int], budget: int, groups: list[list[int]]) -> None:
    assert prefill_groups(lengths, budget) == groups


@pytest.fixture(scope="module")
def llama(tiny_llama: Path) -> TransformersEngine:
    return TransformersEngine.load(inspect_model_path(tiny_llama), "cpu")


def _take(steps: object, n: int) -> list[int]:
    it = iter(steps)  # type: ignore[call-overload]
    return [next(it) for _ in range(n)]


def _params(**sampling: float) -> SamplingParams:
    return ExecuteRequest(job_id="j", prompt="-", **sampling)  # type: ignore[arg-type]


SAMPLINGS = [_params(temperature=0.0), _params(temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.3)]


@pytest.mark.parametrize("params", SAMPLINGS, ids=["greedy", "sampled"])
def test_a_batch_yields_what_each_prompt_yields_alone(
    llama: TransformersEngine, params: SamplingParams
) -> None:
    prompts = [llama.encode(text, None) for text in PROMPTS]
    assert len({len(p) for p in prompts}) > 2, "prompts of different lengths: rows are padded"
    alone = [_take(llama.generate(p, params, seed=100 + i), 16) for i, p in enumerate(prompts)]
    batch = llama.generate_batch([(p, params, 100 + i) for i, p in enumerate(prompts)])
    # Taken in turns, as the decode thread does: one step of each, round and round.
    together: list[list[int]] = [[] for _ in prompts]
    for _ in range(16):
        for row, steps in enumerate(batch):
            together[row].append(next(steps))
    assert together == alone


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "mistral"])
def test_other_architectures_batch_or_fall_back(arch: str, tmp_path: Path) -> None:
    engine = TransformersEngine.load(inspect_model_path(build_tiny_model(tmp_path / arch, arch)), "cpu")
    # Mistral's sliding-window cache cannot be cut into rows: its prompts are prefilled one by one.
    assert engine._batchable is (arch != "mistral")
    prompts = [engine.encode(text, None) for text in PROMPTS[:3]]
    greedy = _params(temperature=0.0)
    alone = [_take(engine.generate(p, greedy, seed=1), 8) for p in prompts]
    assert [_take(s, 8) for s in engine.generate_batch([(p, greedy, 1) for p in prompts])] == alone


def test_a_row_closed_before_the_prefill_leaves_the_others_be(llama: TransformersEngine) -> None:
    greedy = _params(temperature=0.0)
    prompts = [llama.encode(text, None) for text in PROMPTS[:3]]
    first, second, third = llama.generate_batch([(p, greedy, 0) for p in prompts])
    second.close()  # its job was cancelled before its first step
    assert _take(third, 6) == _take(llama.generate(prompts[2], greedy, 0), 6)
    assert _take(first, 6) == _take(llama.generate(prompts[0], greedy, 0), 6)


class Events:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def text(self) -> str:
        return "".join(e.t for e in self.events if isinstance(e, TokenEvent))


def _generation(engine: TransformersEngine, text: str, sink: Events, max_tokens: int = 12) -> Generation:
    request = ExecuteRequest(job_id=f"job-{len(text)}", prompt=text, max_tokens=max_tokens, temperature=0)
    job = Job(request.job_id, request, engine.encode(text, None), seed=0)
    return Generation(engine, job, sink.emit)


def _run_in_turns(generations: list[Generation]) -> None:
    live = list(generations)
    while live:
        live = [g for g in live if g.step()]


def test_prefill_together_gives_generations_the_events_they_have_alone(llama: TransformersEngine) -> None:
    alone = [Events() for _ in PROMPTS]
    for text, sink in zip(PROMPTS, alone, strict=True):
        _run_in_turns([_generation(llama, text, sink)])
    together = [Events() for _ in PROMPTS]
    generations = [_generation(llama, text, sink) for text, sink in zip(PROMPTS, together, strict=True)]
    cancelled = _generation(llama, "cancelled before it began", Events())
    cancelled.job.cancel.set()
    assert prefill_together([*generations, cancelled], max_tokens=4096) == len(PROMPTS)
    assert not cancelled.awaits_prefill
    _run_in_turns([*generations, cancelled])
    assert [s.text() for s in together] == [s.text() for s in alone]
    assert all(isinstance(s.events[-1], EndEvent) for s in together)


def test_nothing_is_batched_alone_or_with_no_budget(llama: TransformersEngine) -> None:
    generations = [_generation(llama, text, Events()) for text in PROMPTS[:2]]
    assert prefill_together(generations[:1], max_tokens=4096) == 0
    assert prefill_together(generations, max_tokens=0) == 0
    # A tiny budget: every prompt is its own group, so nothing is batched.
    assert prefill_together(generations, max_tokens=1) == 0


def test_a_failed_batched_prefill_ends_each_of_its_jobs_with_an_error(
    llama: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def broken(prompts: object) -> None:
        calls.append(prompts)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(llama, "_prefill_rows", broken)
    sinks = [Events() for _ in range(3)]
    generations = [_generation(llama, text, sink) for text, sink in zip(PROMPTS, sinks, strict=False)]
    assert prefill_together(generations, max_tokens=4096) == 3
    _run_in_turns(generations)
    assert len(calls) == 1, "the forward pass is not rerun for each row"
    for sink in sinks:
        assert isinstance(sink.events[-1], ErrorEvent) and "out of memory" in sink.events[-1].message
