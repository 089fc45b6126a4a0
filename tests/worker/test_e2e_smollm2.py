"""End to end on the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF): one worker process."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.worker.helpers import EventStream, execute, request, run_worker, terminal, text_of

# Converting the GGUF takes most of a minute on two cores; the converted copy is kept between
# runs here (git-ignored), keyed by the file's path, size, mtime and the transformers version.
CACHE = Path(__file__).resolve().parents[2] / ".rbees-test" / "worker-gguf-cache"


def test_smollm2_answers_paris_then_drains_on_sigterm(smollm2_gguf: Path, tmp_path: Path) -> None:
    flags = ["--cache-dir", str(CACHE), "--drain-timeout", "3"]
    with run_worker(smollm2_gguf, tmp_path, *flags, worker_id="w-smol", ready_timeout=300) as worker:
        health = request(f"{worker.url}/health")[2]
        assert health["model"] == "SmolLM2-135M-Instruct.Q4_1"
        assert health["context_length"] == 8192

        messages = [{"role": "user", "content": "What is the capital of France?"}]
        events = execute(worker, job_id="paris", messages=messages, temperature=0, max_tokens=40)
        answer = text_of(events)
        assert "Paris" in answer, answer
        assert sum(e["type"] == "token" for e in events) >= 3
        assert terminal(events)["stop_reason"] == "EOS"
        assert "<|im_end|>" not in answer
        assert list(CACHE.glob("gguf/*/model.safetensors")), "the converted model was cached"

        # SIGTERM during a long job: new work gets 503, the job is cancelled after the
        # drain deadline and still ends with one terminal event, and the worker exits 0.
        story = [{"role": "user", "content": "Write a very long story about a bee named Bea."}]
        body = {"job_id": "long", "messages": story, "max_tokens": 2000, "temperature": 0}
        with EventStream(worker, body) as stream:
            events_iter = iter(stream)
            assert next(events_iter)["type"] == "started"
            assert next(events_iter)["type"] == "token"
            worker.proc.signal(signal.SIGTERM)
            while request(f"{worker.url}/health")[2]["status"] != "draining":
                time.sleep(0.02)
            status, _, refused = request(f"{worker.url}/execute", "POST", {"job_id": "late", "prompt": "Hi"})
            assert status == 503 and refused["error"]["code"] == "SHUTTING_DOWN"
            end = terminal(list(events_iter))
        assert end["stop_reason"] == "CANCELLED"
        assert worker.proc.wait(30) == 0
