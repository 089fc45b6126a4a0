"""Prompts that arrive together are prefilled together.

When several jobs wait for their first step (a burst of requests), the decode thread hands them to
the engine as batches: one forward pass for a batch's prompts instead of one each, which on a GPU
costs about what one prompt does and on a CPU still saves each pass's fixed cost. A batch's padded
size (rows times its longest prompt) stays within a token budget, so a burst of long prompts does
not become one huge pass; prompts are grouped by length, so short ones are not padded to long ones.

    prefill_together(newcomers, max_tokens=4096)   # in the decode thread, before their first steps
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from rbees.worker.engines.base import PrefillBatching
from rbees.worker.jobs import Generation

log = logging.getLogger(__name__)


def prefill_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of prompts (by their lengths) grouped for batched prefills: shortest first, each
    group's rows x longest prompt within ``max_tokens``; a prompt too long for any company is a
    group of its own."""
    groups: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        # Sorted by length, so this prompt is the group's longest if it joins.
        if current and lengths[index] * (len(current) + 1) > max_tokens:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups


def prefill_together(generations: Sequence[Generation], max_tokens: int) -> int:
    """Give the generations that await their prefill their rows of batched prefills, when their
    engine batches and there are at least two; return how many were batched."""
    waiting = [g for g in generations if g.awaits_prefill]
    if len(waiting) < 2 or max_tokens <= 0:
        return 0
    engine = waiting[0].engine
    if not isinstance(engine, PrefillBatching):
        return 0
    batched = 0
    for group in prefill_groups([len(g.job.prompt_ids) for g in waiting], max_tokens):
        if len(group) < 2:
            continue
        members = [waiting[i] for i in group]
        for generation, steps in zip(
            members, engine.generate_batch([g.generate_args() for g in members]), strict=True
        ):
            generation.take_steps(steps)
        batched += len(members)
    if batched:
        log.info("prefilling %d prompts in batches", batched)
    return batched
