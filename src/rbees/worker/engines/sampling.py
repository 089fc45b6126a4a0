"""Choosing the next token from a logits vector: pure functions plus one small seeded sampler.

The order follows Hugging Face's: repetition penalty, then temperature, top-k, top-p, min-p.
Temperature 0 is greedy (argmax after the repetition penalty). All tensors are 1-D over the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from rbees.protocol import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the sequence (``seen`` is a bool mask) less (>1) or more (<1) likely."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` most likely tokens (0 = off)."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least ``p``."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = before > p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times that of the most likely token."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


class Sampler:
    """Per-job sampling state: the parameters, a seeded generator and the tokens seen so far."""

    def __init__(self, params: SamplingParams, seed: int, vocab_size: int, prompt_ids: Iterable[int]) -> None:
        self._params = params
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._track_seen = params.repetition_penalty != 1.0
        self._seen = torch.zeros(vocab_size, dtype=torch.bool)
        if self._track_seen:
            ids = [i for i in prompt_ids if 0 <= i < vocab_size]
            if ids:
                self._seen[torch.tensor(ids, dtype=torch.long)] = True

    @property
    def plain_greedy(self) -> bool:
        """Greedy without a repetition penalty: the next token is the logits' argmax, nothing more."""
        return self._params.temperature == 0.0 and not self._track_seen

    def pick(self, logits: torch.Tensor) -> int:
        """Choose the next token from the last position's logits (any device, any float dtype)."""
        if self.plain_greedy:
            token = int(torch.argmax(logits).item())
        else:
            token = self._pick_on_cpu(logits.detach().to("cpu", torch.float32))
        if self._track_seen and token < self._seen.numel():
            self._seen[token] = True
        return token

    def _pick_on_cpu(self, logits: torch.Tensor) -> int:
        params = self._params
        if logits.numel() > self._seen.numel():
            logits = logits[: self._seen.numel()]
        logits = apply_repetition_penalty(logits, self._seen, params.repetition_penalty)
        if params.temperature == 0.0:
            return int(torch.argmax(logits).item())
        tempered = apply_temperature(logits, params.temperature)
        if not math.isfinite(float(tempered.max())):
            # A temperature (or penalty) so small that the scaled logits overflow: sampling at it is,
            # to within float precision, its limit, the most likely token (dividing by a temperature
            # keeps the order).
            return int(torch.argmax(logits).item())
        logits = tempered
        logits = apply_top_k(logits, params.top_k)
        logits = apply_top_p(logits, params.top_p)
        logits = apply_min_p(logits, params.min_p)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator).item())
