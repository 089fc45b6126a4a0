"""``rbees-workerd`` refuses to start, with a message and exit code 2, when it cannot serve safely."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import bin_path, free_port
from tests.worker.helpers import run_worker


def _start(model: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    args = [bin_path("rbees-workerd"), "--worker-id", "w-bad", "--model", str(model)]
    args += ["--port", str(free_port()), "--threads", "1", *extra]
    env = {**os.environ, "RBEES_WORKER_TOKEN": ""}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def _broken_copy(tiny_llama: Path, tmp_path: Path, how: str) -> Path:
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    weights = model / "model.safetensors"
    if how == "truncated":
        os.truncate(weights, weights.stat().st_size - 100)
    elif how == "pickle":
        weights.rename(model / "pytorch_model.bin")
    elif how == "remote-code":
        config = json.loads((model / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
        (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "model.safetensors is truncated"),
        ("pickle", "pickle weights"),
        ("remote-code", "trust_remote_code"),
    ],
)
def test_broken_or_unsafe_model_fails_the_start(
    tiny_llama: Path, tmp_path: Path, how: str, message: str
) -> None:
    result = _start(_broken_copy(tiny_llama, tmp_path, how))
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_missing_model_fails_the_start(tmp_path: Path) -> None:
    result = _start(tmp_path / "no-such-model")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_non_loopback_bind_without_token_is_refused(tiny_llama: Path) -> None:
    result = _start(tiny_llama, "--host", "0.0.0.0")
    assert result.returncode == 2 and "without a token" in result.stderr


def test_absent_backend_is_a_clear_error(tiny_llama: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _start(tiny_llama, "--backend", "cuda")
    assert result.returncode == 2 and "backend cuda is not available" in result.stderr


def test_port_in_use_fails_the_start(tiny_llama: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = _start(tiny_llama, "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2 and "cannot listen" in result.stderr


def test_model_that_fails_to_load_exits_2_after_loading(tiny_llama: Path, tmp_path: Path) -> None:
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (model / "config.json").write_text(json.dumps(config))
    with run_worker(model, tmp_path, worker_id="w-noload", wait=False) as worker:
        code = worker.proc.wait(120)
        log = worker.proc.log_text()
    assert code == 2
    assert "no-such-architecture" in log and "rbees-workerd: error:" in log
