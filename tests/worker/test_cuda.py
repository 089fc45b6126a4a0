"""``rbees-workerd --backend cuda`` on a real GPU: placement, output, concurrency, cancel, a bad --gpu.

Skipped where torch sees no CUDA device (CI runs on CPUs); run on a GPU machine with
``pytest tests/worker/test_cuda.py``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.procs import bin_path, free_port
from tests.worker.helpers import EventStream, Worker, execute, request, run_worker, terminal, text_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SLOTS = 4
PROMPTS = ["Once upon a time", "The bee flew over", "In the beginning there was"]


@pytest.fixture(scope="module")
def worker(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    home = tmp_path_factory.mktemp("cuda-home")
    with run_worker(tiny_llama, home, "--backend", "cuda", "--slots", str(SLOTS), worker_id="w-cuda") as w:
        yield w


def _health(worker: Worker) -> dict[str, Any]:
    status, _, body = request(f"{worker.url}/health")
    assert status == 200
    return dict(body)


@functools.cache
def _loaded(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer, AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to("cuda:0").eval()


def _generate_on_gpu(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """transformers' own greedy generate on the same GPU: what the worker must reproduce."""
    tokenizer, model = _loaded(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to("cuda:0")
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    if new and new[-1] == tokenizer.eos_token_id:
        new = new[:-1]
    return str(tokenizer.decode(new, skip_special_tokens=False))


def test_health_reports_the_gpu_and_its_memory(worker: Worker) -> None:
    health = _health(worker)
    assert (health["status"], health["backend"], health["device"]) == ("healthy", "cuda", "cuda:0")
    # The worker reports torch's allocation on the device: the tiny model's weights are on it.
    assert health["vram_bytes"] > 100_000
    assert (health["slots_total"], health["slots_busy"]) == (SLOTS, 0)


def test_greedy_output_matches_transformers_generate_on_the_gpu(worker: Worker, tiny_llama: Path) -> None:
    for n, prompt in enumerate(PROMPTS):
        events = execute(worker, job_id=f"greedy-{n}", prompt=prompt, max_tokens=24, temperature=0)
        assert terminal(events)["type"] == "end"
        assert text_of(events) == _generate_on_gpu(tiny_llama, prompt, 24), prompt


def test_concurrent_streams_on_the_gpu_all_finish_and_seeds_repeat(worker: Worker) -> None:
    def run(n: int) -> tuple[str, str]:
        body = {"prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": 40, "temperature": 0.9, "seed": n}
        events = execute(worker, job_id=f"conc-{n}-{time.monotonic_ns()}", **body)
        return terminal(events)["type"], text_of(events)

    with ThreadPoolExecutor(SLOTS) as pool:  # one client per slot: more would be refused ALL_SLOTS_BUSY
        first = list(pool.map(run, range(2 * SLOTS)))
        again = list(pool.map(run, range(2 * SLOTS)))
    assert all(kind == "end" for kind, _ in first + again)
    assert [text for _, text in first] == [text for _, text in again]
    assert len({text for _, text in first}) > 1, "different seeds gave one text"


def test_a_dropped_stream_frees_its_gpu_slot(worker: Worker) -> None:
    body = {"job_id": "dropped", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0}
    with EventStream(worker, body) as stream:
        events = iter(stream)
        assert next(events)["type"] == "started"
        assert next(events)["type"] == "token"
        assert _health(worker)["slots_busy"] == 1
    deadline = time.monotonic() + 1.0
    while _health(worker)["slots_busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _health(worker)["slots_busy"] == 0


def test_a_gpu_index_that_does_not_exist_is_a_clear_error(tiny_llama: Path, tmp_path: Path) -> None:
    missing = torch.cuda.device_count()
    args = [bin_path("rbees-workerd"), "--worker-id", "w-gpu", "--port", str(free_port()), "--model"]
    args += [str(tiny_llama), "--backend", "cuda", "--gpu", str(missing)]
    env = {**os.environ, "RBEES_HOME": str(tmp_path)}
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert f"--gpu {missing} does not exist" in result.stderr
