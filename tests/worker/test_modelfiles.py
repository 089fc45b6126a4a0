"""Model path checks: what is served, and clear refusals for missing, broken or unsafe files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from rbees.worker.modelfiles import ModelFileError, inspect_model_path


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _tiny_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.ones((8, 16), dtype=np.float32))
    writer.add_tensor("output.weight", np.ones((8, 16), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_hf_directory_is_accepted(tiny_llama: Path) -> None:
    source = inspect_model_path(tiny_llama)
    assert source.kind == "hf" and source.default_name == "tiny-llama"


def test_gguf_file_and_directory_holding_one_are_accepted(tmp_path: Path) -> None:
    gguf_file = _tiny_gguf(tmp_path / "tiny.gguf")
    assert inspect_model_path(gguf_file).kind == "gguf"
    assert inspect_model_path(tmp_path).path == gguf_file
    assert inspect_model_path(gguf_file).default_name == "tiny"


def test_embedded_smollm2_gguf_is_whole(smollm2_gguf: Path) -> None:
    assert inspect_model_path(smollm2_gguf).kind == "gguf"


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        inspect_model_path(tmp_path / "nope")


def test_truncated_gguf(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "t.gguf")
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(ModelFileError, match="truncated"):
        inspect_model_path(path)
    os.truncate(path, 40)
    with pytest.raises(ModelFileError, match="truncated"):
        inspect_model_path(path)


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelFileError, match="not a GGUF"):
        inspect_model_path(path)


def test_truncated_safetensors(tiny_llama: Path, tmp_path: Path) -> None:
    model = _copy(tiny_llama, tmp_path / "m")
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ModelFileError, match=r"model\.safetensors is truncated"):
        inspect_model_path(model)


def test_corrupt_safetensors_header(tiny_llama: Path, tmp_path: Path) -> None:
    model = _copy(tiny_llama, tmp_path / "m")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"garbage!!!!!"
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt"):
        inspect_model_path(model)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_weights_are_refused(tiny_llama: Path, tmp_path: Path, name: str) -> None:
    model = _copy(tiny_llama, tmp_path / "m")
    (model / "model.safetensors").rename(model / name)
    with pytest.raises(ModelFileError, match="pickle"):
        inspect_model_path(model)
    with pytest.raises(ModelFileError, match="pickle"):
        inspect_model_path(model / name)


def test_remote_code_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    model = _copy(tiny_llama, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="trust_remote_code"):
        inspect_model_path(model)


def test_missing_shard_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    model = _copy(tiny_llama, tmp_path / "m")
    index = {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="model-00002-of-00002"):
        inspect_model_path(model)


def test_directory_without_weights_or_config(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not a model directory"):
        inspect_model_path(tmp_path)
