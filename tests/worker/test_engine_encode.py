"""The engine's prompt encoding (the Rust tokenizer called directly) gives transformers' own ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbees.protocol import ChatMessage
from rbees.worker.engines.transformers_engine import TransformersEngine
from rbees.worker.modelfiles import inspect_model_path

TEXTS = [
    "Once upon a time",
    "The capital of France is Paris.",
    "  leading and trailing spaces  ",
    "Zürich, São Paulo, Kraków and 東京; emoji 🐝🍯 and a tab\there",
    "<|im_start|>user\nspecial tokens written as text<|im_end|>",
    "def add(a, b):\n    return a + b\n",
    "x" * 5000,
]


@pytest.fixture(params=["tiny_llama", "tiny_qwen"])
def engine(request: pytest.FixtureRequest) -> TransformersEngine:
    path: Path = request.getfixturevalue(request.param)
    return TransformersEngine.load(inspect_model_path(path), "cpu")


def test_prompts_encode_as_transformers_does(engine: TransformersEngine) -> None:
    hf = engine._tokenizer
    assert engine._rust is not None, "the tiny models have fast tokenizers: the direct path is taken"
    for text in TEXTS:
        assert engine.encode(text, None) == hf.encode(text, add_special_tokens=True), text


def test_chat_messages_encode_as_transformers_does(engine: TransformersEngine) -> None:
    messages = [
        ChatMessage(role="system", content="You are terse."),
        ChatMessage(role="user", content="Zürich or 東京? 🐝"),
    ]
    rendered = engine._tokenizer.apply_chat_template(
        [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
    )
    expected = engine._tokenizer.encode(rendered, add_special_tokens=False)
    assert engine.encode(None, messages) == expected
