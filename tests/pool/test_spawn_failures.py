"""Spawn preflight, failure modes and stop escalation.

Preflight and port tests need no worker. Failure modes a real worker cannot show on demand (never
ready, ignoring SIGTERM, leaving children) use ``stub_workerd.py``, which follows the worker's
command-line contract.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from tests.pool.helpers import first_port_at, rbees_pool, register_local, stub_env, worker_processes
from tests.support.procs import bin_path, free_port, port_in_use


@pytest.fixture
def tiny(pool_home: Path, tiny_llama: Path) -> str:
    register_local("tiny", tiny_llama)
    first_port_at(pool_home, free_port())
    return "tiny"


def records(home: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in (home / "workers").glob("*.json")]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def spawn_stub(mode: str = "ok", *extra: str, env: dict[str, str] | None = None) -> dict[str, object]:
    done = rbees_pool(
        "worker", "spawn", "cpu", "--model", "tiny", "--json", *extra, env=stub_env(mode) | (env or {})
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ preflight


def test_unknown_model(tiny: str) -> None:
    done = rbees_pool("worker", "spawn", "cpu", "--model", "nope", env=stub_env())
    assert done.returncode == 3
    assert done.stderr.strip() == "error: unknown model 'nope' (see `rbees-pool models catalog`)"


def test_model_not_downloaded(pool_home: Path) -> None:
    done = rbees_pool("worker", "spawn", "cpu", "--model", "smollm2-135m", env=stub_env())
    assert done.returncode == 5
    assert "not downloaded; run `rbees-pool models download smollm2-135m` first" in done.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["cuda"], 5, "CUDA is not available here"),
        (["metal"], 5, "Metal (MPS) needs macOS"),
        (["cpu", "--gpu", "0"], 2, "--gpu is only for cuda and metal workers"),
        (
            ["cpu", "--orchestrator", "http://127.0.0.1:9"],
            5,
            "orchestrator http://127.0.0.1:9 does not answer",
        ),
        (["cpu", "--orchestrator", "ftp://x"], 2, "invalid --orchestrator"),
        (["cpu", "--orchestrator", "http://127.0.0.1:abc"], 2, "invalid --orchestrator"),
        (["cpu", "--orchestrator", "http://127.0.0.1:99999"], 2, "invalid --orchestrator"),
        (["cpu", "--host", "999.1.1.1"], 2, "invalid --host '999.1.1.1': not an address of this machine"),
        (["cpu", "--advertise-host", "bad host"], 2, "invalid --advertise-host"),
        (["cpu", "--orchestrator-token", "two words"], 2, "invalid --orchestrator-token"),
    ],
)
def test_preflight_refusals_start_nothing(
    tiny: str, pool_home: Path, args: list[str], code: int, message: str
) -> None:
    if args[0] == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    done = rbees_pool("worker", "spawn", args[0], "--model", tiny, *args[1:], env=stub_env())
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert records(pool_home) == []
    assert list((pool_home / "logs").glob("*.log")) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--refill-wait", "2"],
        ["--refill-wait", "-0.5"],
        ["--prefill-batch-tokens", "-1"],
        ["--prefill-gather", "2"],
    ],
)
def test_worker_tuning_out_of_range_is_a_usage_error(tiny: str, pool_home: Path, args: list[str]) -> None:
    done = rbees_pool("worker", "spawn", "cpu", "--model", tiny, *args, env=stub_env())
    assert done.returncode == 2, done.stderr
    assert f"Invalid value for '{args[0]}'" in done.stderr
    assert records(pool_home) == []


def test_not_enough_memory(pool_home: Path, tmp_path: Path, tiny_llama: Path) -> None:
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    with (huge / "model.safetensors").open("wb") as f:  # sparse: 4 TB on paper, nothing on disk
        f.truncate(4 * 10**12)
    register_local("huge", huge)
    assert (pool_home / "models" / "huge" / "model.safetensors").stat().st_nlink == 2  # linked, not copied
    done = rbees_pool("worker", "spawn", "cpu", "--model", "huge", env=stub_env())
    assert done.returncode == 5
    assert "not enough free RAM for huge" in done.stderr
    assert "--skip-memory-check" in done.stderr
    assert records(pool_home) == []


# ------------------------------------------------------------------ ports


def test_an_explicit_port_in_use_is_refused(tiny: str, pool_home: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = rbees_pool("worker", "spawn", "cpu", "--model", tiny, "--port", str(port), env=stub_env())
    assert done.returncode == 4
    assert f"port {port} is already in use" in done.stderr
    assert records(pool_home) == []


def test_ports_in_use_by_anything_are_skipped(pool_home: Path, tiny: str) -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        busy = s.getsockname()[1]
        first_port_at(pool_home, busy)
        record = spawn_stub()
    assert int(record["port"]) > busy  # type: ignore[call-overload]
    rbees_pool("worker", "stop-all", check=True)


def test_concurrent_spawns_never_share_a_port(pool_home: Path, tiny: str) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        spawned = list(pool.map(lambda _: spawn_stub(), range(6)))
    ports = [r["port"] for r in spawned]
    assert len(set(ports)) == 6
    assert len({r["worker_id"] for r in spawned}) == 6
    assert len(json.loads(rbees_pool("worker", "list", "--json", check=True).stdout)) == 6
    rbees_pool("worker", "stop-all", check=True)
    assert worker_processes(pool_home) == []
    assert not any(port_in_use(int(p)) for p in ports)  # type: ignore[call-overload]


# ------------------------------------------------------------------ failure modes


def test_a_worker_that_never_gets_ready_is_killed_after_the_timeout(pool_home: Path, tiny: str) -> None:
    started = time.monotonic()
    done = rbees_pool("worker", "spawn", "cpu", "--model", tiny, "--timeout", "3", env=stub_env("hang"))
    assert done.returncode == 7
    assert "error: worker worker-cpu-" in done.stderr
    assert "was not ready after 3s" in done.stderr
    assert "stub worker" in done.stderr  # the log's tail
    assert time.monotonic() - started < 60
    assert records(pool_home) == []
    assert worker_processes(pool_home) == []
    log = next((pool_home / "logs").glob("*.log")).read_text()
    port = int(log.split("listening on 127.0.0.1:")[1].split()[0])
    assert not port_in_use(port)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_an_interrupted_spawn_stops_the_worker(pool_home: Path, tiny: str, sig: signal.Signals) -> None:
    cmd = [bin_path("rbees-pool"), "worker", "spawn", "cpu", "--model", tiny]
    proc = subprocess.Popen(cmd, env={**os.environ, **stub_env("hang")}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(r.get("pid") for r in records(pool_home)):
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)
        (record,) = records(pool_home)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "interrupted: the worker was stopped" in err
    assert gone(int(record["pid"]))  # type: ignore[call-overload]
    assert records(pool_home) == []


def test_a_worker_that_exits_early_shows_its_log(pool_home: Path, tiny: str) -> None:
    done = rbees_pool("worker", "spawn", "cpu", "--model", tiny, env=stub_env("exit"))
    assert done.returncode == 7
    assert "exited with code 2 before it was ready" in done.stderr
    assert "cannot load model" in done.stderr
    assert records(pool_home) == []


def test_stop_escalates_to_sigkill(pool_home: Path, tiny: str) -> None:
    record = spawn_stub("ignore-term")
    started = time.monotonic()
    done = rbees_pool("worker", "stop", str(record["worker_id"]), "--timeout", "1", check=True)
    assert "killed after the grace period" in done.stderr
    assert time.monotonic() - started < 30
    assert gone(int(record["pid"]))  # type: ignore[call-overload]
    assert not port_in_use(int(record["port"]))  # type: ignore[call-overload]
    assert records(pool_home) == []


def test_stop_takes_the_workers_children_too(pool_home: Path, tiny: str) -> None:
    record = spawn_stub("child")
    pid = int(record["pid"])  # type: ignore[call-overload]
    deadline = time.monotonic() + 10
    while not (children := psutil.Process(pid).children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children
    rbees_pool("worker", "stop", str(record["worker_id"]), check=True)
    assert gone(pid)
    assert all(gone(c.pid) for c in children)


def test_dead_workers_are_shown_and_pruned(pool_home: Path, tiny: str) -> None:
    alive, dead = spawn_stub(), spawn_stub()
    os.killpg(int(dead["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    deadline = time.monotonic() + 10
    while not gone(int(dead["pid"])) and time.monotonic() < deadline:  # type: ignore[call-overload]
        time.sleep(0.05)
    views = {v["worker_id"]: v["status"] for v in json.loads(rbees_pool("worker", "list", "--json").stdout)}
    assert views == {alive["worker_id"]: "Running", dead["worker_id"]: "Dead"}
    assert "Dead" in rbees_pool("worker", "list").stdout

    pruned = json.loads(rbees_pool("worker", "prune", "--json", check=True).stdout)
    assert [p["worker_id"] for p in pruned] == [dead["worker_id"]]
    assert [r["worker_id"] for r in records(pool_home)] == [alive["worker_id"]]
    rbees_pool("worker", "stop-all", check=True)


def test_stopping_a_dead_worker_removes_its_record(pool_home: Path, tiny: str) -> None:
    record = spawn_stub()
    os.killpg(int(record["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    time.sleep(0.5)
    done = rbees_pool("worker", "stop", str(record["worker_id"]), check=True)
    assert "was not running; record removed" in done.stderr
    assert records(pool_home) == []


@pytest.mark.parametrize("worker_id", ["worker-cpu-00000000", "../../etc/passwd", "a b"])
def test_stop_unknown_worker(worker_id: str) -> None:
    done = rbees_pool("worker", "stop", worker_id)
    assert done.returncode == 3
    assert done.stderr.strip() == f"error: unknown worker {worker_id!r} (see `rbees-pool worker list`)"


def test_spawn_prints_id_port_and_pid(pool_home: Path, tiny: str) -> None:
    done = rbees_pool("worker", "spawn", "cpu", "--model", tiny, env=stub_env())
    assert done.returncode == 0, done.stderr
    printed = dict(line.split(maxsplit=1) for line in done.stdout.splitlines())
    (record,) = records(pool_home)
    assert printed == {k: str(record[k]) for k in ("worker_id", "port", "pid", "uri")}
    assert f"{record['worker_id']} is ready at http://127.0.0.1:" in done.stderr
    rbees_pool("worker", "stop-all", check=True)


# ------------------------------------------------------------------ the contract with the worker


class _Orchestrator:
    """Just enough of rbees-orcd, on every address: /health, registration, and the worker list."""

    def __init__(self, accept: bool = True) -> None:
        self.registrations: list[tuple[str | None, dict[str, object]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/v2/workers":
                    workers = [body for _auth, body in outer.registrations] if accept else []
                    self._reply(200, json.dumps({"workers": workers}).encode())
                else:
                    self._reply(200, b'{"status":"healthy","pools":0,"workers":0,"queue_depth":0}')

            def do_DELETE(self) -> None:
                self._reply(200, b"{}")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.registrations.append((self.headers.get("Authorization"), body))
                self._reply(200 if accept else 401, b"{}")

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def orchestrator() -> Iterator[_Orchestrator]:
    orch = _Orchestrator()
    yield orch
    orch.close()


def _lan_address() -> str:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return str(a.address)
    pytest.skip("no non-loopback IPv4 address here")


def test_a_remote_orchestrator_gets_the_worker_on_a_reachable_address(
    pool_home: Path, tiny: str, tmp_path: Path, orchestrator: _Orchestrator
) -> None:
    calls = tmp_path / "calls.jsonl"
    url = f"http://{_lan_address()}:{orchestrator.port}"
    record = spawn_stub(
        "ok", "--orchestrator", url, "--advertise-host", "pool.example", "--slots", "3",
        "--prefill-batch-tokens", "2048", "--refill-wait", "0.25", "--prefill-gather", "0.3",
        env={"STUB_CALLS": str(calls), "RBEES_ORCHESTRATOR_TOKEN": "orch-secret", "RBEES_POOL_NAME": "p1"},
    )  # fmt: skip
    (call,) = [json.loads(line) for line in calls.read_text().splitlines()]
    argv = call["argv"]

    def arg(flag: str) -> list[str]:
        return [argv[i + 1] for i, a in enumerate(argv) if a == flag]

    stored = json.loads((pool_home / "workers" / f"{record['worker_id']}.json").read_text())
    assert arg("--host") == ["0.0.0.0"]  # beyond loopback, always with its token
    assert call["token"] == stored["token"]
    assert stored["token"] not in argv  # the token travels in the environment, not in `ps`
    assert call["callback_token"] == "orch-secret"
    assert arg("--advertise-url") == [f"http://pool.example:{record['port']}"]
    assert record["uri"] == f"http://pool.example:{record['port']}"
    assert arg("--callback-url")[1] == f"{url}/v2/workers/register"
    assert arg("--callback-url")[0].startswith("http://127.0.0.1:")
    assert arg("--model-id") == ["tiny"]
    assert arg("--pool") == ["p1"]
    assert arg("--slots") == ["3"]
    assert (arg("--prefill-batch-tokens"), arg("--refill-wait")) == (["2048"], ["0.25"])
    assert arg("--prefill-gather") == ["0.3"]
    assert arg("--model") == [str(pool_home / "models" / "tiny")]

    (auth, body) = orchestrator.registrations[0]
    assert auth == "Bearer orch-secret"
    assert body["worker_id"] == record["worker_id"]
    assert body["uri"] == record["uri"]
    rbees_pool("worker", "stop-all", check=True)


def test_a_refused_registration_is_reported(pool_home: Path, tiny: str) -> None:
    orch = _Orchestrator(accept=False)
    try:
        done = rbees_pool(
            "worker", "spawn", "cpu", "--model", tiny, "--orchestrator", f"http://127.0.0.1:{orch.port}",
            env=stub_env(),
        )  # fmt: skip
    finally:
        orch.close()
    assert done.returncode == 0, done.stderr
    assert f"warning: http://127.0.0.1:{orch.port} does not list worker-cpu-" in done.stderr
    rbees_pool("worker", "stop-all", check=True)


def test_a_missing_worker_program_is_a_clear_error(pool_home: Path, tiny: str) -> None:
    done = rbees_pool(
        "worker", "spawn", "cpu", "--model", tiny, env={"RBEES_WORKERD": "/nonexistent/rbees-workerd"}
    )
    assert done.returncode == 7
    assert "error: cannot start /nonexistent/rbees-workerd: No such file or directory" in done.stderr
    assert records(pool_home) == []
