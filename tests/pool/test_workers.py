"""Real ``rbees-workerd`` processes on tiny generated models: spawn, list, health, execute, stop."""

from __future__ import annotations

import json
import stat
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.pool.helpers import first_port_at, rbees_pool, register_local, worker_processes
from tests.support.procs import ManagedProcess, bin_path, free_port, port_in_use, wait_http

SPAWN_TIMEOUT = 240.0


def spawn(*extra: str, model: str = "tiny", env: dict[str, str] | None = None) -> dict[str, object]:
    args = ["worker", "spawn", "cpu", "--model", model, "--threads", "1", "--json", *extra]
    done = rbees_pool(*args, env=env, timeout=SPAWN_TIMEOUT + 30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def execute(uri: str, token: str | None) -> tuple[int, str]:
    body = json.dumps({"job_id": "t-1", "prompt": "Hello", "max_tokens": 2, "seed": 1}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(f"{uri}/execute", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_two_concurrent_spawns_then_list_health_execute_and_stop(pool_home: Path, tiny_llama: Path) -> None:
    register_local("tiny", tiny_llama)
    base = first_port_at(pool_home, free_port())
    with ThreadPoolExecutor(max_workers=2) as pool:
        records = list(pool.map(lambda _: spawn(), range(2)))

    ports = sorted(int(r["port"]) for r in records)  # type: ignore[call-overload]
    assert ports[0] != ports[1]
    assert all(p >= base for p in ports)
    for r in records:
        assert set(r) >= {"worker_id", "pid", "backend", "model_id", "port", "gpu", "started_at", "uri"}
        assert str(r["worker_id"]).startswith("worker-cpu-")
        assert r["backend"] == "cpu"
        assert r["model_id"] == "tiny"
        assert "token" not in r
        assert psutil.pid_exists(int(r["pid"]))  # type: ignore[call-overload]
        path = pool_home / "workers" / f"{r['worker_id']}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text())["token"]

    listed = rbees_pool("worker", "list", "--json", check=True)
    views = {v["worker_id"]: v for v in json.loads(listed.stdout)}
    assert set(views) == {r["worker_id"] for r in records}
    for v in views.values():
        assert v["status"] == "Running"
        assert v["health"]["status"] == "healthy"
        assert v["health"]["model"] == "tiny"
        assert "token" not in json.dumps(v)
    table = rbees_pool("worker", "list", check=True).stdout
    assert "Active Workers" in table
    assert "Total workers: 2" in table
    assert table.count("Running") == 2

    first, second = records
    token = json.loads((pool_home / "workers" / f"{first['worker_id']}.json").read_text())["token"]
    status, body = execute(str(first["uri"]), token)
    assert status == 200, body
    assert '"type":"end"' in body.replace(" ", "")
    assert execute(str(first["uri"]), None)[0] == 401

    done = rbees_pool("worker", "stop", str(first["worker_id"]), check=True)
    assert "stopped" in done.stderr
    assert not psutil.pid_exists(int(first["pid"])) or _zombie(int(first["pid"]))  # type: ignore[call-overload]
    assert not port_in_use(int(first["port"]))  # type: ignore[call-overload]
    assert not (pool_home / "workers" / f"{first['worker_id']}.json").exists()

    rbees_pool("worker", "stop-all", check=True)
    assert not port_in_use(int(second["port"]))  # type: ignore[call-overload]
    assert json.loads(rbees_pool("worker", "list", "--json", check=True).stdout) == []
    assert worker_processes(pool_home) == []


def test_a_model_that_cannot_load_leaves_nothing_behind(
    pool_home: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_llama / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt")
    register_local("broken", broken)
    port = first_port_at(pool_home, free_port())
    done = rbees_pool(
        "worker", "spawn", "cpu", "--model", "broken", "--threads", "1", "--timeout", "200", timeout=260
    )
    assert done.returncode == 7, done.stderr
    first_line = next(line for line in done.stderr.splitlines() if line.startswith("error:"))
    assert first_line.startswith("error: worker worker-cpu-")
    assert "before it was ready" in first_line
    assert "last lines of" in done.stderr
    assert done.stdout == ""
    assert list((pool_home / "workers").glob("*.json")) == []
    assert worker_processes(pool_home) == []
    assert not port_in_use(port)
    assert len(list((pool_home / "logs").glob("worker-cpu-*.log"))) == 1  # the log is kept for the operator


@pytest.mark.timeout(420)
def test_spawn_registers_with_the_orchestrator(pool_home: Path, tiny_llama: Path, tmp_path: Path) -> None:
    register_local("tiny", tiny_llama)
    first_port_at(pool_home, free_port())
    orcd_port = free_port()
    url = f"http://127.0.0.1:{orcd_port}"
    args = [
        bin_path("rbees-orcd"),
        "--port",
        str(orcd_port),
        "--state-dir",
        str(tmp_path / "orcd"),
        "--registration-token",
        "reg-secret",
    ]
    with ManagedProcess(args, log=tmp_path / "orcd.log") as orcd:
        wait_http(f"{url}/health", timeout=60, proc=orcd)
        pool_name = {"RBEES_POOL_NAME": "test-pool"}
        record = spawn("--orchestrator", url, "--orchestrator-token", "reg-secret", env=pool_name)
        assert record["orchestrator"] == url
        assert record["uri"] == f"http://127.0.0.1:{record['port']}"  # a local orchestrator: loopback
        req = urllib.request.Request(f"{url}/v2/workers", headers={"Authorization": "Bearer reg-secret"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            workers = json.loads(resp.read())["workers"]
        ours = [w for w in workers if w["worker_id"] == record["worker_id"]]
        assert ours, workers
        assert ours[0]["uri"] == record["uri"]
        assert ours[0]["model"] == "tiny"
        assert ours[0]["pool"] == "test-pool"

        rbees_pool("worker", "stop", str(record["worker_id"]), check=True)
        with urllib.request.urlopen(req, timeout=10) as resp:
            workers = json.loads(resp.read())["workers"]
        assert record["worker_id"] not in [w["worker_id"] for w in workers]

        # Without the token the orchestrator refuses the worker (and the list of workers to the check):
        # the spawn says so instead of only that the worker is ready.
        args = ["worker", "spawn", "cpu", "--model", "tiny", "--threads", "1", "--orchestrator", url]
        done = rbees_pool(*args, timeout=SPAWN_TIMEOUT + 30)
        assert done.returncode == 0, done.stderr
        assert f"warning: {url} did not take worker-cpu-" in done.stderr
        assert "refused (401)" in done.stderr
        rbees_pool("worker", "stop-all", check=True)


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
