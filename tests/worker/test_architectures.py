"""The worker serves every architecture transformers loads without remote code, not just Llama."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny_models import build_tiny_model
from tests.worker.helpers import execute, run_worker, terminal


@pytest.mark.parametrize("arch", ["mistral", "phi3"])
def test_worker_streams_from_each_architecture(arch: str, tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / f"tiny-{arch}", arch)
    with run_worker(model, tmp_path, worker_id=f"w-{arch}") as worker:
        body = {"job_id": "j1", "prompt": "Hello", "max_tokens": 6, "temperature": 0, "stop": []}
        first = execute(worker, **body)
        again = execute(worker, **{**body, "job_id": "j2"})
    assert first[0]["type"] == "started"
    end = terminal(first)
    assert end["type"] == "end", end
    assert end["stop_reason"] in {"MAX_TOKENS", "EOS"}
    tokens = [e for e in first if e["type"] == "token"]
    assert 1 <= len(tokens) <= 6
    # Greedy decoding is deterministic on every architecture.
    assert [e.get("t") for e in first if e["type"] == "token"] == [
        e.get("t") for e in again if e["type"] == "token"
    ]
