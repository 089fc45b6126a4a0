"""Jobs that decode at the same time share one forward pass per step.

Each job's generator, once its prompt is prefilled and its first token made, joins a
``DecodeBatch`` as a row: its KV cache becomes one row of a batch cache, left-padded to the
longest row, with a padding mask and each row's own positions. A row asks for its next token; when
it has none waiting, one forward pass makes the next token of every row (sampled with each row's
own sampler, so greedy and seeded output is what the job would get alone), and the other rows find
theirs waiting at their turn. The worker's decode thread turns the jobs round-robin, so each round
of turns costs one forward pass instead of one per job.

A failed step ends every row with its error (the batch cache may be half updated) and the batch
starts afresh. A row that ends (its generator is closed) leaves at the next step, and columns that
have become padding for every remaining row are dropped. A row asked for a token while another still has one
waiting takes part with a masked hole instead (its cache gets a column that nothing attends to):
that keeps every row's output exact whatever order the turns come in.

Everything runs in the decode thread; nothing here is thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch

from rbees.worker.engines.sampling import Sampler

Layers = list[tuple[torch.Tensor, torch.Tensor]]
"""A KV cache's (keys, values) per layer, each [B, H, L, D]."""
Forward = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None, Any], tuple[torch.Tensor, Any]]
"""(input ids [B,1], attention mask [B,L+1], positions [B,1], cache) -> (last logits [B,V], cache);
mask and positions are None while no row has padding (every row's positions are its columns)."""


@dataclass(eq=False)
class Row:
    sampler: Sampler
    last: int  # the token fed at the row's next step
    position: int  # that token's position
    cache: Any = None  # its own KV cache until it joins the batch's
    waiting: int | None = None  # made, not yet taken
    alive: bool = True
    failed: Exception | None = None  # a step failed: the row's cache is lost


class DecodeBatch:
    def __init__(self, forward: Forward, make_cache: Callable[[Layers], Any]) -> None:
        self._forward = forward
        self._make_cache = make_cache
        self._rows: list[Row] = []  # the batch cache's rows, in order
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [B, L]: 1 where a cache column is the row's own
        self._padded = False  # whether the mask has a 0 anywhere
        self._ones = 0  # columns of ones not yet appended to the mask (steps taken while unpadded)
        self._device = torch.device("cpu")
        self._joining: list[Row] = []

    @property
    def size(self) -> int:
        return sum(r.alive for r in self._rows) + len(self._joining)

    def rows(self, sampler: Sampler, first: int, position: int, cache: Any) -> Generator[int, None, None]:
        """``first`` (the token its prefill made), then the job's next tokens, for a job whose prompt
        (``position`` tokens) is in ``cache``. The row joins as ``first`` is taken, so every job that
        has its first token takes part in the next step."""
        row = Row(sampler, first, position, cache)
        self._joining.append(row)
        try:
            yield first
            while True:
                if row.failed is not None:
                    raise row.failed
                if row.waiting is None:
                    self._step()
                token, row.waiting = row.waiting, None
                assert token is not None
                yield token
        finally:
            row.alive = False
            row.cache = None
            if row in self._joining:
                self._joining.remove(row)

    def _step(self) -> None:
        try:
            with torch.inference_mode():
                self._admit()
                self._advance()
        except Exception as exc:
            # A pass that failed midway may have grown some layers' caches and not others: no row
            # can go on from it. Each ends with this error; rows that join later start afresh.
            for row in [*self._rows, *self._joining]:
                row.failed = exc
            self._rows, self._joining, self._cache, self._mask = [], [], None, None
            self._padded, self._ones = False, 0
            raise

    def _advance(self) -> None:
        rows = self._rows
        device = self._device
        advancing = [r.waiting is None for r in rows]
        if not self._padded and all(advancing):
            # No padding anywhere: the model's own causal mask and positions are right, and its
            # fastest path; the mask only gets this step's column when it is next needed.
            ids = torch.tensor([[r.last] for r in rows], device=device)
            logits, self._cache = self._forward(ids, None, None, self._cache)
            self._ones += 1
        else:
            # A row with a token still waiting gets a hole: a dummy input in a column nothing
            # attends to.
            pairs = zip(rows, advancing, strict=True)
            ids = torch.tensor([[r.last if a else 0] for r, a in pairs], device=device)
            positions = torch.tensor([[r.position] for r in rows], device=device)
            column = torch.tensor([[1 if a else 0] for a in advancing], dtype=torch.long, device=device)
            mask = torch.cat([self._current_mask(), column], dim=1)
            logits, self._cache = self._forward(ids, mask, positions, self._cache)
            self._mask, self._padded = mask, True
        greedy: list[int] | None = None
        for index, (row, advance) in enumerate(zip(rows, advancing, strict=True)):
            if not advance:
                continue
            if row.sampler.plain_greedy:
                if greedy is None:  # one transfer for every greedy row
                    greedy = logits.argmax(dim=-1).tolist()
                token = greedy[index]
            else:
                token = row.sampler.pick(logits[index])
            row.waiting = token
            row.last = token
            row.position += 1

    def _current_mask(self) -> torch.Tensor:
        """The mask with the columns of the steps taken while unpadded (ones) appended."""
        assert self._mask is not None
        if self._ones:
            self._mask, self._ones = _ones_after(self._mask, self._ones), 0
        return self._mask

    def _admit(self) -> None:
        """Drop rows that ended, then append the rows that joined (padding either side as needed)."""
        if any(not r.alive for r in self._rows):
            keep = [i for i, r in enumerate(self._rows) if r.alive]
            self._rows = [self._rows[i] for i in keep]
            if not keep:
                self._cache, self._mask, self._padded, self._ones = None, None, False, 0
            else:
                index = torch.tensor(keep, device=self._device)
                self._mask = self._current_mask().index_select(0, index)
                used = torch.nonzero(self._mask.any(dim=0))
                start = int(used[0]) if used.numel() else self._mask.shape[1]
                self._mask = self._mask[:, start:]
                self._padded = not bool(self._mask.all())
                for layer in self._cache.layers:
                    layer.keys = layer.keys.index_select(0, index)[:, :, start:]
                    layer.values = layer.values.index_select(0, index)[:, :, start:]
        for row in self._joining:
            self._join(row)
        self._joining = []

    def _join(self, row: Row) -> None:
        layers = [(layer.keys, layer.values) for layer in row.cache.layers]
        row.cache = None
        own = layers[0][0].shape[2]
        device = layers[0][0].device
        row_mask = torch.ones((1, own), dtype=torch.long, device=device)
        if self._cache is None:
            self._cache = self._make_cache(layers)
            self._mask, self._padded, self._ones, self._device = row_mask, False, 0, device
            self._rows = [row]
            return
        self._mask = self._current_mask()
        width = self._mask.shape[1]
        if own < width:
            layers = [(_pad_left(k, width - own), _pad_left(v, width - own)) for k, v in layers]
            row_mask = _pad_left_2d(row_mask, width - own)
        if own != width:
            self._padded = True
        if own > width:
            for layer in self._cache.layers:
                layer.keys = _pad_left(layer.keys, own - width)
                layer.values = _pad_left(layer.values, own - width)
            self._mask = _pad_left_2d(self._mask, own - width)
        for layer, (keys, values) in zip(self._cache.layers, layers, strict=True):
            layer.keys = torch.cat([layer.keys, keys], dim=0)
            layer.values = torch.cat([layer.values, values], dim=0)
        self._mask = torch.cat([self._mask, row_mask], dim=0)
        self._rows.append(row)


def _ones_after(mask: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones((mask.shape[0], columns))], dim=1)


def _pad_left(states: torch.Tensor, columns: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, columns + L, D], zeros first."""
    pad = states.new_zeros((states.shape[0], states.shape[1], columns, states.shape[3]))
    return torch.cat([pad, states], dim=2)


def _pad_left_2d(mask: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros((mask.shape[0], columns)), mask], dim=1)
