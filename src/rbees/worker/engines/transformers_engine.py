"""The transformers + torch engine: Hugging Face safetensors directories and GGUF files.

Generation is a hand-written decode loop over the model's KV cache (one forward pass per
``next()``), not ``model.generate``, so the worker streams every token as it is made and can
stop between any two steps. Prompts that arrive together are prefilled in one forward pass
(``generate_batch``: left-padded, each row's KV cache cut out afterwards), then each job decodes on
its own cache. Code shipped with a model is never run (``trust_remote_code``
is always off) and the hub is never contacted (``local_files_only``).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from rbees.protocol import ChatMessage, SamplingParams
from rbees.worker.engines import gguf_cache
from rbees.worker.engines.base import EngineError, GenerateArgs, PromptError
from rbees.worker.engines.chat_template import ChatTemplate, pick_template
from rbees.worker.engines.decode_batch import DecodeBatch, Layers
from rbees.worker.engines.devices import device_memory_bytes, dtype_for
from rbees.worker.engines.sampling import Sampler
from rbees.worker.modelfiles import ModelSource

log = logging.getLogger(__name__)

_DEFAULT_CONTEXT = 2048
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class TransformersEngine:
    def __init__(self, model: Any, tokenizer: Any, device: str) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._device = device
        self._torch_device = torch.device(device)
        config = model.config
        head = model.get_output_embeddings()
        self._vocab_size = int(head.weight.shape[0] if head is not None else config.vocab_size)
        self._context_length = _context_length(config)
        self._eos = _eos_ids(model, tokenizer)
        forward = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        self._batchable = _can_split_prefill(model, forward)
        # One forward pass per step for every job decoding at once, where the cache can be batched.
        self._decoding = DecodeBatch(self._batch_forward, self._row_cache) if self._batchable else None
        self._logits_kwargs: dict[str, int] = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._template: ChatTemplate | None = None
        self._template_error = "the model has no chat template; send 'prompt' instead of 'messages'"
        source = pick_template(getattr(tokenizer, "chat_template", None))
        if source is not None:
            try:
                self._template = ChatTemplate(
                    source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
                )
            except PromptError as exc:
                self._template_error = str(exc)
        self._weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
            b.numel() * b.element_size() for b in model.buffers()
        )
        self._rust = _rust_tokenizer(tokenizer)

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, source: ModelSource, device: str, cache_dir: Path | None = None) -> TransformersEngine:
        started = time.monotonic()
        try:
            if source.kind == "hf":
                model, tokenizer = _load_hf_dir(source.path, device)
            else:
                model, tokenizer = _load_gguf(source.path, device, cache_dir)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
            raise EngineError(f"cannot load {source.path.name}: {type(exc).__name__}: {exc}") from exc
        model.eval()
        log.info("loaded %s on %s in %.1fs", source.path.name, device, time.monotonic() - started)
        return cls(model, tokenizer, device)

    # --- the Engine interface --------------------------------------------------------------

    @property
    def device(self) -> str:
        return self._device

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def memory_bytes(self) -> int:
        on_device = device_memory_bytes(self._device)
        return self._weight_bytes if on_device is None else on_device

    def encode(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> list[int]:
        if messages is not None:
            if self._template is None:
                raise PromptError(self._template_error)
            text = self._template.render(messages, add_generation_prompt=True)
            ids = self._encode(text, special=False)
        else:
            ids = self._encode(prompt or "", special=True)
        if not ids:
            raise PromptError("the prompt encodes to no tokens")
        return [int(i) for i in ids]

    def _encode(self, text: str, *, special: bool) -> list[int]:
        # The Rust tokenizer straight away where there is one: what transformers' encode calls in
        # the end, without its tens of microseconds of Python around it (run on the event loop).
        if self._rust is not None:
            return list(self._rust.encode(text, add_special_tokens=special).ids)
        return list(self._tokenizer.encode(text, add_special_tokens=special))

    def decode(self, token_ids: Sequence[int]) -> str:
        text = self._tokenizer.decode(
            list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return str(text)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int
    ) -> Generator[int, None, None]:
        sampler = Sampler(params, seed, self._vocab_size, prompt_ids)
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self._torch_device)
        if self._decoding is None:
            yield from self._decode(sampler, input_ids, None)
            return
        with torch.inference_mode():
            out = self._model(input_ids=input_ids, use_cache=True, **self._logits_kwargs)
            cache = _output_cache(out)
            token = sampler.pick(out.logits[0, -1])
        del out
        yield from self._decoding.rows(sampler, token, len(prompt_ids), cache)

    def generate_batch(self, requests: Sequence[GenerateArgs]) -> list[Generator[int, None, None]]:
        """``generate`` for each request, their prompts prefilled together in one forward pass,
        which runs at the first ``next()`` of any of them. Greedy and seeded sampling give what
        ``generate`` gives. Models whose cache cannot be cut into rows (sliding-window or other
        special layers) get ``generate`` for each."""
        if len(requests) < 2 or not self._batchable:
            return [self.generate(*r) for r in requests]
        batch = _BatchPrefill(self, requests)
        return [self._from_batch(batch, i) for i in range(len(requests))]

    def _from_batch(self, batch: _BatchPrefill, row: int) -> Generator[int, None, None]:
        prompt_ids, params, seed = batch.requests[row]
        sampler = Sampler(params, seed, self._vocab_size, prompt_ids)
        logits, cache = batch.take(row)
        token = sampler.pick(logits)
        del logits
        if self._decoding is not None:
            yield from self._decoding.rows(sampler, token, len(prompt_ids), cache)
        else:
            yield token
            next_ids = torch.tensor([[token]], dtype=torch.long, device=self._torch_device)
            yield from self._decode(sampler, next_ids, cache)

    def _decode(self, sampler: Sampler, input_ids: torch.Tensor, cache: Any) -> Generator[int, None, None]:
        """One job alone: one forward pass per token (models whose cache cannot be batched)."""
        model, device = self._model, self._torch_device
        while True:
            with torch.inference_mode():
                out = model(
                    input_ids=input_ids, use_cache=True, **{self._cache_kwarg: cache}, **self._logits_kwargs
                )
                cache = _output_cache(out)
                token = sampler.pick(out.logits[0, -1])
            del out
            yield token
            input_ids = torch.tensor([[token]], dtype=torch.long, device=device)

    def _batch_forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        kwargs = {self._cache_kwarg: cache, **self._logits_kwargs}
        if mask is not None:
            kwargs |= {"attention_mask": mask, "position_ids": positions}
        out = self._model(input_ids=input_ids, use_cache=True, **kwargs)
        return out.logits[:, -1], _output_cache(out)

    def _row_cache(self, layers: Layers) -> Any:
        return DynamicCache(ddp_cache_data=layers, config=self._model.config)

    def _prefill_rows(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[Any]]:
        """One forward pass over left-padded prompts: each row's last logits and its own KV cache."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        positions = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            pad = width - len(prompt)
            ids[row, pad:] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, pad:] = 1
            positions[row, pad:] = torch.arange(len(prompt))
        device = self._torch_device
        padded = bool((mask == 0).any())
        with torch.inference_mode():
            out = self._model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device) if padded else None,
                position_ids=positions.to(device),
                use_cache=True,
                **self._logits_kwargs,
            )
            layers = [(layer.keys, layer.values) for layer in _output_cache(out).layers]
            logits = out.logits[:, -1]
            del out
            caches = []
            for row, prompt in enumerate(prompts):
                pad = width - len(prompt)
                own = [(k[row : row + 1, :, pad:], v[row : row + 1, :, pad:]) for k, v in layers]
                caches.append(self._row_cache(own))
        return logits, caches


class _BatchPrefill:
    """The shared prefill of a batch: run once, at the first row that asks; each row then takes its
    logits and cache (and the batch lets go of them)."""

    def __init__(self, engine: TransformersEngine, requests: Sequence[GenerateArgs]) -> None:
        self.requests = list(requests)
        self._engine = engine
        self._rows: list[tuple[torch.Tensor, Any] | None] | None = None
        self._failed: Exception | None = None

    def take(self, row: int) -> tuple[torch.Tensor, Any]:
        if self._failed is not None:  # every row fails as the forward pass did, without a rerun
            raise self._failed
        if self._rows is None:
            try:
                logits, caches = self._engine._prefill_rows([r[0] for r in self.requests])
            except Exception as exc:
                self._failed = exc
                raise
            self._rows = [(logits[i], cache) for i, cache in enumerate(caches)]
        taken = self._rows[row]
        if taken is None:
            raise RuntimeError(f"row {row} of the prefill batch was already taken")
        self._rows[row] = None
        return taken


def _can_split_prefill(model: Any, forward: Any) -> bool:
    """Whether a batched prefill's KV cache can be cut into one cache per row: the forward takes a
    padding mask and positions, and every layer of the model's cache is a plain growing one."""
    if "attention_mask" not in forward or "position_ids" not in forward:
        return False
    try:
        layers = DynamicCache(config=model.config).layers
    except (AttributeError, TypeError, ValueError):
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _rust_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a fast tokenizer, set up as transformers' own ``encode``
    leaves it (no truncation, no padding, special tokens not split); ``None`` for other tokenizers."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    if not isinstance(backend, Tokenizer):
        return None
    tokenizer.encode("rbees", add_special_tokens=True)  # applies transformers' settings to the backend
    if backend.truncation is not None or backend.padding is not None:
        return None
    if backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _context_length(config: Any) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _CONTEXT_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return _DEFAULT_CONTEXT


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _transformers() -> Any:
    """transformers, untyped: its auto classes confuse type checkers."""
    return importlib.import_module("transformers")


def _load_hf_dir(path: Path, device: str) -> tuple[Any, Any]:
    hf = _transformers()
    tokenizer = hf.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    dtype = dtype_for(device)
    model = hf.AutoModelForCausalLM.from_pretrained(
        str(path),
        trust_remote_code=False,
        local_files_only=True,
        use_safetensors=True,
        dtype="auto" if dtype is None else dtype,
        # Straight onto the GPU, without a full copy in host memory first.
        device_map=None if device == "cpu" else {"": device},
    )
    return model, tokenizer


def _load_gguf(path: Path, device: str, cache_dir: Path | None) -> tuple[Any, Any]:
    if cache_dir is not None:
        cached = gguf_cache.lookup(cache_dir, path)
        if cached is not None:
            log.info("loading the converted copy of %s from %s", path.name, cached)
            return _load_hf_dir(cached, device)
    hf = _transformers()
    log.info("converting %s (GGUF parsing is slow; later loads use the cache)", path.name)
    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True, "trust_remote_code": False}
    tokenizer = hf.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = hf.AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    if cache_dir is not None:
        cached = gguf_cache.store(cache_dir, path, model, tokenizer)
        if cached is not None:
            del model
            return _load_hf_dir(cached, device)
    return model.to(device), tokenizer
