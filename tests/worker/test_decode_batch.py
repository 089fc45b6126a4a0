"""Jobs decoding at once share one forward pass per step and each gets what it would get alone."""

from __future__ import annotations

import random
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from rbees.protocol import ExecuteRequest, SamplingParams
from rbees.worker.engines.transformers_engine import TransformersEngine
from rbees.worker.modelfiles import inspect_model_path
from tests.worker.test_prefill import PROMPTS


def _params(i: int) -> SamplingParams:
    sampled = {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.2}
    return ExecuteRequest(job_id="j", prompt="-", **(sampled if i % 2 else {"temperature": 0.0}))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> TransformersEngine:
    return TransformersEngine.load(inspect_model_path(tiny_llama), "cpu")


@pytest.fixture
def forwards(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Each batched decode step's batch size and whether it was given a padding mask."""
    assert engine._decoding is not None
    steps: list[tuple[int, bool]] = []
    forward = engine._decoding._forward

    def noting(ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        steps.append((ids.shape[0], mask is not None))
        return forward(ids, mask, positions, cache)

    monkeypatch.setattr(engine._decoding, "_forward", noting)
    return steps


def _alone(engine: TransformersEngine, i: int, n: int) -> list[int]:
    steps = engine.generate(engine.encode(PROMPTS[i], None), _params(i), seed=i)
    try:
        return [next(steps) for _ in range(n)]
    finally:
        steps.close()


def _start(engine: TransformersEngine, i: int) -> Generator[int, None, None]:
    return engine.generate(engine.encode(PROMPTS[i], None), _params(i), seed=i)


def test_jobs_in_turns_share_one_forward_pass_per_round(
    engine: TransformersEngine, forwards: list[tuple[int, bool]]
) -> None:
    alone = [_alone(engine, i, 12) for i in range(len(PROMPTS))]
    forwards.clear()
    jobs = [_start(engine, i) for i in range(len(PROMPTS))]
    got: list[list[int]] = [[] for _ in jobs]
    for _ in range(12):  # round-robin, as the decode thread turns them
        for i, job in enumerate(jobs):
            got[i].append(next(job))
    for job in jobs:
        job.close()
    assert got == alone
    # The first token of each comes from its prefill; the other 11 rounds are one pass each.
    assert [size for size, _ in forwards] == [len(PROMPTS)] * 11


def test_jobs_that_join_and_leave_midway_get_what_they_get_alone(
    engine: TransformersEngine, forwards: list[tuple[int, bool]]
) -> None:
    lengths = {0: 20, 1: 6, 2: 14, 3: 9, 4: 17, 5: 3}
    alone = {i: _alone(engine, i, n) for i, n in lengths.items()}
    got: dict[int, list[int]] = {i: [] for i in lengths}
    live: dict[int, Generator[int, None, None]] = {}
    arrivals = {0: [1, 5], 2: [2], 4: [0, 3], 7: [4]}  # round -> jobs that start then
    for round_ in range(30):
        for i in arrivals.get(round_, []):
            live[i] = _start(engine, i)
        for i, job in list(live.items()):
            got[i].append(next(job))
            if len(got[i]) == lengths[i]:  # done: the job leaves (its generator is closed)
                job.close()
                del live[i]
    assert got == alone
    sizes = [size for size, _ in forwards]
    assert max(sizes) <= len(PROMPTS) and min(sizes) >= 1
    assert engine._decoding is not None and engine._decoding.size == 0


def test_turns_in_any_order_still_give_exact_tokens(engine: TransformersEngine) -> None:
    alone = [_alone(engine, i, 10) for i in range(4)]
    jobs = [_start(engine, i) for i in range(4)]
    got: list[list[int]] = [[] for _ in jobs]
    order = random.Random(7)
    while any(len(g) < 10 for g in got):
        i = order.choice([k for k in range(4) if len(got[k]) < 10])
        got[i].append(next(jobs[i]))  # some rows ask twice while others still have a token waiting
    for job in jobs:
        job.close()
    assert got == alone


def test_padding_no_row_needs_is_dropped_when_rows_leave(engine: TransformersEngine) -> None:
    batch = engine._decoding
    assert batch is not None
    long_job, short_job = _start(engine, 2), _start(engine, 1)
    for _ in range(3):
        next(long_job)
        next(short_job)
    assert batch._mask is not None and batch._mask.shape[0] == 2
    long_job.close()
    next(short_job)  # the next step drops the long row and the columns only it used
    assert batch._mask is not None and batch._mask.shape[0] == 1
    assert bool(batch._mask.all()), "no column left that is padding for every row"
    short_job.close()


def test_a_failed_step_ends_every_row_and_later_jobs_start_afresh(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = engine._decoding
    assert batch is not None
    forward = batch._forward
    jobs = [_start(engine, i) for i in range(3)]
    for job in jobs:
        next(job)

    def broken(ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(batch, "_forward", broken)
    for job in jobs:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            next(job)
    monkeypatch.setattr(batch, "_forward", forward)
    assert batch.size == 0
    fresh = _start(engine, 4)
    assert [next(fresh) for _ in range(5)] == _alone(engine, 4, 5)
    fresh.close()


def test_rows_without_padding_take_the_models_own_mask_and_positions(
    engine: TransformersEngine, forwards: list[tuple[int, bool]]
) -> None:
    expected = _alone(engine, 0, 4)
    forwards.clear()
    alone = _start(engine, 0)
    assert [next(alone) for _ in range(4)] == expected
    assert forwards == [(1, False)] * 3  # one row: nothing padded
    forwards.clear()
    other = _start(engine, 2)  # a longer prompt: the first row gets padding
    next(other)
    next(alone)
    next(other)
    assert forwards == [(2, True)]
    alone.close()
    other.close()
