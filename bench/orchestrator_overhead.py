"""What the orchestrator adds: time to first token and tokens/s, direct to a worker vs through rbees-orcd.

Both paths run interleaved in one process (direct round, orchestrated round, alternating which goes
first), at each concurrency, with the same seed and greedy sampling so both do the same work, under
two loads: ``burst`` (every stream submits at the same instant: the worst case for admission) and
``steady`` (each stream submits its next job as soon as its last one ended, with lengths that vary,
so new jobs arrive while the others decode: what N concurrent users look like).

    # self-contained: spawns one rbees-workerd and one rbees-orcd on free ports, then stops them
    python bench/orchestrator_overhead.py --spawn-model PATH [--slots 16] [--rounds 20]

    # against running daemons
    python bench/orchestrator_overhead.py --worker http://127.0.0.1:8001 \
        --orchestrator http://127.0.0.1:8080 --model NAME

Prints TTFT p50/p99 for each path, the added latency (orchestrated minus direct, p50 and p99) and the
throughput ratio (aggregate tokens/s orchestrated / direct). Goal: added p50 <= 2 ms, ratio >= 0.95.
Between rounds it waits until the worker reports no busy slot, so one round never queues behind the
last. With --spawn-model it also prints the orchestrator's own CPU time per job and per token.

--pin (spawn mode, Linux) gives the worker CPU 0 to itself, this client CPU 1 and the orchestrator the
rest: the deployment rbees is built for, where workers sit on their own (GPU) machines, clients on
theirs, and the orchestrator takes CPU time from neither. Without it all three share every CPU, and on
a small machine the orchestrator's CPU time for relaying shows up as the worker's lost tokens/s.
With only two CPUs the client has to share one: --pin-client orchestrator (the default) runs it beside
the orchestrator, which then waits for the CPU while the client sends a burst (the first request of
16 reached rbees-orcd ~1.6 ms after it was sent, the worker ~0.4 ms on the direct path);
--pin-client worker runs it beside the worker, where both paths pay for it alike, but a client that
answers an ``end`` at once can then slip its next request in before the worker's next pass on the
direct path only (the orchestrated one is a relay hop later).

--emulate-pass-ms MS (spawn mode) makes every forward pass of the worker's model take MS longer,
busy holding the GIL (``bench/slow_pass_worker.py``): a GPU's launch-bound pass, whose cost hardly
depends on its rows, on a CPU; for the effects of when a request arrives within a pass. The worker
still runs on its cpu backend, so pass the GPU defaults it should use, e.g.
``--worker-args "--refill-wait 0.125 --prefill-gather 0.5"``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

BIN = Path(sys.executable).parent


@dataclass
class Sample:
    ttft: float
    tokens: int
    elapsed: float


@dataclass
class Series:
    ttft: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # aggregate tokens/s per round
    errors: int = 0
    jobs: int = 0
    tokens: int = 0


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> Sample:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with session.post(url, json=body, headers={"Accept": "text/event-stream", **headers}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if not line.startswith(b"data: "):
                        continue
                    kind = json.loads(line[6:])["type"]
                    if kind == "token":
                        tokens += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                    elif kind == "error":
                        raise RuntimeError(line.decode())
    if ttft is None:
        raise RuntimeError("no token")
    return Sample(ttft, tokens, time.perf_counter() - t0)


def _request(
    args: argparse.Namespace, direct: bool, max_tokens: int
) -> tuple[str, dict[str, Any], dict[str, str]]:
    sampling = {"prompt": args.prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": 7}
    if direct:
        body = {**sampling, "job_id": "bench-" + uuid.uuid4().hex[:12]}
        return args.worker + "/execute", body, _auth(args.worker_token)
    return args.orchestrator + "/v2/tasks", {**sampling, "model": args.model}, _auth(args.api_token)


async def burst_round(
    session: aiohttp.ClientSession, args: argparse.Namespace, direct: bool, concurrency: int, series: Series
) -> None:
    """All streams submit at the same instant, each one job of --max-tokens."""
    tasks = [one_stream(session, *_request(args, direct, args.max_tokens)) for _ in range(concurrency)]
    await settle(session, args)
    t0 = time.perf_counter()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - t0
    ok = [r for r in results if isinstance(r, Sample)]
    series.errors += len(results) - len(ok)
    for r in results:
        if not isinstance(r, Sample):
            print(f"  error: {r}", file=sys.stderr)
    series.ttft.extend(r.ttft for r in ok)
    series.jobs += len(ok)
    series.tokens += sum(r.tokens for r in ok)
    if ok:
        series.rates.append(sum(r.tokens for r in ok) / wall)


async def steady_round(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    direct: bool,
    concurrency: int,
    series: Series,
    seed: int,
) -> None:
    """Each stream submits its next job as soon as the last one ended (--jobs-per-stream of them), with
    lengths drawn around --max-tokens from ``seed`` (the same draw for both paths), so the streams drift
    apart and jobs arrive while others decode. Each stream's first job starts in the opening burst
    and is left out of the TTFT samples (the burst load measures that)."""
    rng = random.Random(seed)
    low, high = max(1, args.max_tokens // 2), args.max_tokens * 3 // 2
    plans = [[rng.randint(low, high) for _ in range(args.jobs_per_stream)] for _ in range(concurrency)]

    async def stream(plan: list[int]) -> tuple[list[float], int, int, int]:
        ttfts: list[float] = []
        tokens = jobs = 0
        for k, max_tokens in enumerate(plan):
            try:
                sample = await one_stream(session, *_request(args, direct, max_tokens))
            except (RuntimeError, aiohttp.ClientError, OSError) as exc:  # counted; the stream stops
                print(f"  error: {exc}", file=sys.stderr)
                return ttfts, tokens, jobs, 1
            if k > 0:
                ttfts.append(sample.ttft)
            tokens += sample.tokens
            jobs += 1
        return ttfts, tokens, jobs, 0

    await settle(session, args)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(stream(plan) for plan in plans))
    wall = time.perf_counter() - t0
    for ttfts, tokens, jobs, errors in results:
        series.ttft.extend(ttfts)
        series.tokens += tokens
        series.jobs += jobs
        series.errors += errors
    series.rates.append(sum(r[1] for r in results) / wall)


async def settle(session: aiohttp.ClientSession, args: argparse.Namespace) -> None:
    """Wait (up to 10 s) until the worker has no busy slot."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with session.get(args.worker + "/health") as resp:
            if (await resp.json()).get("slots_busy") == 0:
                return
        await asyncio.sleep(0.02)


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def run(args: argparse.Namespace) -> int:
    connector = aiohttp.TCPConnector(limit=0)
    failed = False
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        for load in args.load:
            for concurrency in args.concurrency:
                if load == "steady" and concurrency == 1:
                    continue  # one stream has no other jobs to arrive among: the burst load covers it
                failed = await compare(session, args, load, concurrency) or failed
    return 1 if failed and args.strict else 0


async def compare(
    session: aiohttp.ClientSession, args: argparse.Namespace, load: str, concurrency: int
) -> bool:
    """Direct and orchestrated rounds, interleaved (alternating which goes first); print the figures."""

    async def one(direct: bool, series: Series, r: int) -> None:
        if load == "burst":
            await burst_round(session, args, direct, concurrency, series)
        else:
            await steady_round(session, args, direct, concurrency, series, seed=r)

    direct, orch = Series(), Series()
    for w in range(args.warmup):
        await one(True, Series(), -1 - w)
        await one(False, Series(), -1 - w)
    cpu = OrcdCpu(args.orcd_pid)
    for r in range(args.rounds):
        order = [(True, direct), (False, orch)] if r % 2 == 0 else [(False, orch), (True, direct)]
        for is_direct, series in order:
            if not is_direct:
                cpu.resume()
            await one(is_direct, series, r)
            if not is_direct:
                cpu.pause()
    added50 = (pct(orch.ttft, 50) - pct(direct.ttft, 50)) * 1000
    added99 = (pct(orch.ttft, 99) - pct(direct.ttft, 99)) * 1000
    ratio = statistics.mean(orch.rates) / statistics.mean(direct.rates)
    if load == "burst":
        shape = f"{args.rounds} rounds x {concurrency} streams at once x {args.max_tokens} tokens"
    else:
        shape = (
            f"{args.rounds} rounds x {concurrency} streams x {args.jobs_per_stream} jobs back to back, "
            f"{max(1, args.max_tokens // 2)}-{args.max_tokens * 3 // 2} tokens"
        )
    print(f"{load} load, concurrency {concurrency}: {shape}")
    for name, s in (("direct", direct), ("orchestrated", orch)):
        p50, p99 = pct(s.ttft, 50) * 1000, pct(s.ttft, 99) * 1000
        rate = statistics.mean(s.rates)
        ttft = f"TTFT p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
        print(f"  {name:13s} {ttft}  {rate:8.1f} tok/s  errors {s.errors}")
        if args.deciles:
            deciles = " ".join(f"{pct(s.ttft, q) * 1000:.1f}" for q in range(10, 100, 10))
            print(f"  {'':13s} TTFT p10..p90 ms: {deciles}")
    verdict = "ok" if added50 <= 2.0 and ratio >= 0.95 else "MISSED"
    added = f"added TTFT p50 {added50:+.2f} ms  p99 {added99:+.2f} ms"
    print(f"  {added}  throughput ratio {ratio:.3f}  [{verdict}]")
    if cpu.total is not None and orch.jobs and orch.tokens:
        per_job = cpu.total / orch.jobs * 1000
        per_token = cpu.total / orch.tokens * 1e6
        kernel = cpu.system / cpu.total if cpu.total else 0.0
        print(
            f"  orchestrator CPU {per_job:.2f} ms per job, {per_token:.0f} us per token "
            f"(all in; {kernel:.0%} in the kernel)"
        )
    return verdict != "ok" or bool(direct.errors or orch.errors)


class OrcdCpu:
    """CPU seconds the orchestrator process spent during the orchestrated rounds (spawn mode only),
    in all and in the kernel (``system``: its socket calls, loopback TCP included)."""

    def __init__(self, pid: int | None) -> None:
        self.total: float | None = None
        self.system = 0.0
        self._proc = None
        self._mark = (0.0, 0.0)
        if pid is not None:
            import psutil

            self._proc = psutil.Process(pid)
            self.total = 0.0

    def _now(self) -> tuple[float, float]:
        assert self._proc is not None
        t = self._proc.cpu_times()
        return float(t.user + t.system), float(t.system)

    def resume(self) -> None:
        if self._proc is not None:
            self._mark = self._now()

    def pause(self) -> None:
        if self._proc is not None and self.total is not None:
            total, system = self._now()
            self.total += total - self._mark[0]
            self.system += system - self._mark[1]


# --- self-contained mode -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_json(url: str, timeout: float, until: str | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = json.loads(resp.read())
                if until is None or body.get("status") == until:
                    return body
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        time.sleep(0.2)


@contextlib.contextmanager
def spawned(args: argparse.Namespace) -> Iterator[None]:
    tmp = Path(tempfile.mkdtemp(prefix="rbees-bench-"))
    orc_port, w_port = free_port(), free_port()
    args.orchestrator = f"http://127.0.0.1:{orc_port}"
    args.worker = f"http://127.0.0.1:{w_port}"
    args.model = "bench-model"
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    layout = _cpu_layout(args.pin, args.pin_client)
    if layout is not None:
        os.sched_setaffinity(0, layout.orchestrator)  # inherited by the orchestrator spawned next
    try:
        log = (tmp / "orcd.log").open("wb")
        procs.append(
            subprocess.Popen(
                [str(BIN / "rbees-orcd"), "--port", str(orc_port), "--state-dir", str(tmp / "state"),
                 "--log-level", "warning", "--queue-size", "4096", *shlex.split(args.orchestrator_args)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
            )
        )  # fmt: skip
        wait_json(args.orchestrator + "/health", 60)
        args.orcd_pid = procs[0].pid
        if layout is not None:
            os.sched_setaffinity(0, layout.client)
        log = (tmp / "worker.log").open("wb")
        pin = ["taskset", "-c", _cpu_list(layout.worker)] if layout is not None else []
        workerd = [str(BIN / "rbees-workerd")]
        if args.emulate_pass_ms:
            workerd = [sys.executable, str(Path(__file__).with_name("slow_pass_worker.py"))]
            env["RBEES_BENCH_PASS_MS"] = str(args.emulate_pass_ms)
        procs.append(
            subprocess.Popen(
                [*pin, *workerd, "--worker-id", "bench-worker",
                 "--model", str(args.spawn_model),
                 "--model-id", args.model, "--port", str(w_port), "--slots", str(args.slots),
                 "--threads", str(args.threads),
                 "--callback-url", args.orchestrator + "/v2/workers/register",
                 *shlex.split(args.worker_args)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
            )
        )  # fmt: skip
        wait_json(args.worker + "/health", 600, until="healthy")
        deadline = time.monotonic() + 30
        while not wait_json(args.orchestrator + "/health", 10)["workers"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the worker never registered")
            time.sleep(0.1)
        print(f"spawned rbees-orcd {args.orchestrator} and rbees-workerd {args.worker} (logs in {tmp})")
        if layout is not None:
            print(
                f"pinned: worker on CPU {_cpu_list(layout.worker)}, orchestrator on "
                f"{_cpu_list(layout.orchestrator)}, client on {_cpu_list(layout.client)}"
            )
        yield
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@dataclass(frozen=True)
class CpuLayout:
    worker: set[int]
    orchestrator: set[int]
    client: set[int]


def _cpu_layout(pin: bool, client_beside: str) -> CpuLayout | None:
    """Who runs on which CPUs for --pin (None: not pinning). The worker gets the first CPU; with three
    or more, the client the second and the orchestrator the rest; with two, the client shares the
    worker's or the orchestrator's (``client_beside``)."""
    if not pin:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    worker = {cpus[0]}
    if len(cpus) >= 3:
        return CpuLayout(worker, set(cpus[2:]), {cpus[1]})
    orchestrator = {cpus[1]}
    return CpuLayout(worker, orchestrator, worker if client_beside == "worker" else orchestrator)


def _cpu_list(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--spawn-model", type=Path, help="model path: spawn a worker and an orchestrator for the run"
    )
    ap.add_argument("--worker", help="worker base URL (direct path)")
    ap.add_argument("--worker-token")
    ap.add_argument("--orchestrator", help="orchestrator base URL")
    ap.add_argument("--api-token")
    ap.add_argument("--model", help="model name as registered with the orchestrator")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    # One round of one stream is a single ~0.1 s job: 10 rounds left the ratio +-10% between runs.
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--load",
        type=lambda v: [x.strip() for x in v.split(",")],
        default=["burst", "steady"],
        help="burst (every stream submits at once), steady (streams submit back to back), or both",
    )
    ap.add_argument("--jobs-per-stream", type=int, default=6, help="steady load: jobs each stream runs")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker-args", default="", help="extra rbees-workerd arguments (spawn mode)")
    ap.add_argument(
        "--orchestrator-args",
        default="",
        help="extra rbees-orcd arguments (spawn mode), e.g. --worker-channels false",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="spawn mode: the worker gets CPU 0, the client CPU 1, the orchestrator the others",
    )
    ap.add_argument(
        "--pin-client",
        choices=["orchestrator", "worker"],
        default="orchestrator",
        help="--pin on a machine with two CPUs: whose CPU the client shares",
    )
    ap.add_argument(
        "--emulate-pass-ms",
        type=float,
        default=0,
        metavar="MS",
        help="spawn mode: every forward pass of the worker's model takes MS longer (a GPU-like pass)",
    )
    ap.add_argument(
        "--deciles",
        action="store_true",
        help="print each path's TTFT deciles too (on a GPU they show which forward pass requests landed in)",
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = ap.parse_args()
    if not set(args.load) <= {"burst", "steady"}:
        ap.error("--load takes burst, steady or burst,steady")
    args.orcd_pid = None
    if args.spawn_model:
        with spawned(args):
            return asyncio.run(run(args))
    if not (args.worker and args.orchestrator and args.model):
        ap.error("give --spawn-model, or --worker, --orchestrator and --model")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
