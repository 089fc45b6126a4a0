"""Sampling filters and the seeded sampler, on hand-made logits."""

from __future__ import annotations

import math

import torch

from rbees.protocol import SamplingParams
from rbees.worker.engines.sampling import (
    Sampler,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
)

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])


def _kept(logits: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(logits.tolist()) if not math.isinf(v)]


def test_top_k_keeps_the_k_best() -> None:
    assert _kept(apply_top_k(LOGITS, 2)) == [0, 1]
    assert _kept(apply_top_k(LOGITS, 0)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.softmax(LOGITS, -1).tolist()
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert _kept(apply_top_p(LOGITS, 0.7)) == [0, 1]
    assert _kept(apply_top_p(LOGITS, 0.01)) == [0]
    assert _kept(apply_top_p(LOGITS, 1.0)) == [0, 1, 2, 3, 4]


def test_min_p_drops_tokens_far_below_the_best() -> None:
    assert _kept(apply_min_p(LOGITS, 0.3)) == [0, 1]
    assert _kept(apply_min_p(LOGITS, 0.0)) == [0, 1, 2, 3, 4]


def test_repetition_penalty_lowers_seen_tokens_both_signs() -> None:
    seen = torch.tensor([True, False, False, True, False])
    out = apply_repetition_penalty(LOGITS, seen, 2.0).tolist()
    assert out == [1.0, 1.0, 0.5, -2.0, -3.0]


def _draw(params: SamplingParams, seed: int, n: int = 40) -> list[int]:
    logits = torch.linspace(0.0, 1.0, 50)
    sampler = Sampler(params, seed, 50, prompt_ids=[])
    return [sampler.pick(logits) for _ in range(n)]


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    params = SamplingParams(prompt="x", temperature=1.0)
    assert _draw(params, 7) == _draw(params, 7)
    assert _draw(params, 7) != _draw(params, 8)


def test_temperature_zero_is_greedy() -> None:
    params = SamplingParams(prompt="x", temperature=0.0)
    assert set(_draw(params, 1)) == {49}


def test_greedy_with_repetition_penalty_avoids_repeats() -> None:
    params = SamplingParams(prompt="x", temperature=0.0, repetition_penalty=10.0)
    picks = _draw(params, 1, n=3)
    assert picks == [49, 48, 47]


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    params = SamplingParams(prompt="x", temperature=2.0, top_k=1)
    assert set(_draw(params, 3)) == {49}


def test_temperatures_and_penalties_too_small_to_scale_by_pick_their_limit_the_best_token() -> None:
    # Dividing float32 logits by these overflows; sampling once failed with "probability tensor
    # contains either inf, nan or element < 0".
    mixed = torch.tensor([1.0, 2.0, -3.0, 5.0, 0.5])
    negative = torch.tensor([-4.0, -1.0, -2.0, -3.0, -5.0])
    for temperature in (1e-300, 5e-324, 1e-40):
        for logits, best in ((mixed, 3), (negative, 1)):
            params = SamplingParams(prompt="x", temperature=temperature)
            assert Sampler(params, 7, 5, []).pick(logits) == best
    # a penalty below 1 favours tokens already seen: this small, a seen token with a positive logit
    # is all that is left
    params = SamplingParams(prompt="x", temperature=0.7, repetition_penalty=1e-300)
    assert [Sampler(params, seed, 5, [0]).pick(mixed) for seed in range(5)] == [0] * 5
