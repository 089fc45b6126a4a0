"""A real worker prefills a burst of requests in batches and answers each as it would alone."""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.worker.helpers import execute, run_worker, terminal, text_of

PROMPTS = [
    "Once upon a time",
    "Hello",
    "The quick brown fox jumps over the lazy dog",
    "def add(a, b):",
    "A",
    "Zürich, São Paulo and Kraków",
    "1, 2, 3,",
    "Once upon a time there was a bee",
]


def test_a_burst_is_prefilled_in_batches_with_the_answers_it_gets_alone(
    tiny_llama: Path, tmp_path: Path
) -> None:
    with run_worker(tiny_llama, tmp_path, "--slots", str(len(PROMPTS)), worker_id="w-burst") as worker:

        def run(i: int) -> str:
            job_id = f"j{i}-{os.urandom(3).hex()}"
            events = execute(worker, job_id=job_id, prompt=PROMPTS[i], max_tokens=12, temperature=0)
            assert terminal(events)["type"] == "end"
            return text_of(events)

        alone = [run(i) for i in range(len(PROMPTS))]
        # Hold the worker while the burst is sent, so every request is waiting when it goes on.
        os.kill(worker.proc.proc.pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                futures = [pool.submit(run, i) for i in range(len(PROMPTS))]
                time.sleep(0.5)  # the threads connect and send; the kernel queues it all for the worker
                os.kill(worker.proc.proc.pid, signal.SIGCONT)
                together = [f.result(timeout=60) for f in futures]
        finally:
            os.kill(worker.proc.proc.pid, signal.SIGCONT)
        log = worker.proc.log_text()
    assert together == alone
    batched = [int(n) for n in re.findall(r"prefilling (\d+) prompts in batches", log)]
    assert batched and sum(batched) >= 2, log
