"""The one small interface every inference engine of the worker implements.

An engine holds one loaded model. The worker asks it to turn a request into prompt token ids,
then pulls sampled token ids from ``generate`` one decode step at a time; everything else
(stop sequences, UTF-8 safe text, cancellation, slots, events) lives outside the engine.

Exception tree::

    EngineError            the model cannot be loaded or run (the worker exits 2 at load)
    PromptError            this request's prompt cannot be built (a 400 for the client)
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Protocol, runtime_checkable

from rbees.protocol import ChatMessage, SamplingParams


class EngineError(Exception):
    """Loading or running the model failed."""


class PromptError(ValueError):
    """The prompt of one request cannot be built (no chat template, a template error, ...)."""


class Engine(Protocol):
    @property
    def device(self) -> str:
        """The device the model runs on, as reported in health (``cpu``, ``cuda:0``, ``mps``)."""
        ...

    @property
    def context_length(self) -> int:
        """How many tokens (prompt plus generated) fit in the model's context window."""
        ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    def memory_bytes(self) -> int:
        """Device memory in use (cuda/mps), or the bytes of the resident weights on cpu."""
        ...

    def encode(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> list[int]:
        """Token ids of a raw prompt, or of chat messages rendered with the model's chat template."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int
    ) -> Generator[int, None, None]:
        """Yield one sampled token id per decode step, forever; the caller stops pulling when done.

        Each ``next()`` runs exactly one forward pass, so a caller that checks a cancel flag
        between steps cancels within one step. Closing the iterator frees the KV cache.
        """
        ...


GenerateArgs = tuple[Sequence[int], SamplingParams, int]
"""What ``generate`` takes: prompt token ids, sampling parameters, seed."""


@runtime_checkable
class PrefillBatching(Protocol):
    """An engine that can prefill several prompts in one forward pass."""

    def generate_batch(self, requests: Sequence[GenerateArgs]) -> list[Generator[int, None, None]]:
        """``generate`` for each request, the prompts prefilled together (at the first ``next()`` of
        any of the generators); each yields what ``generate`` would have yielded for it."""
        ...


EngineLoader = Callable[[], Engine]
