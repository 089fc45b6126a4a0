"""A worker spawned, listed, used and stopped on a remote pool over SSH, with a tiny real model."""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from tests.ctl.conftest import PoolLab
from tests.support.procs import get_json


def test_a_worker_is_spawned_and_stopped_remotely(pool_lab: PoolLab, tiny_llama: Path) -> None:
    reg = pool_lab.rbees(
        "pool", "models", "register", "--host", "a", "--id", "tiny", "--name", "Tiny Llama",
        "--repo", "test/tiny-llama", "--architecture", "llama", "--json",
    )  # fmt: skip
    assert reg.returncode == 0, reg.stderr
    assert json.loads(reg.stdout)["id"] == "tiny"
    got = pool_lab.rbees("pool", "models", "download", "tiny", "--from", str(tiny_llama), "--host", "a")
    assert got.returncode == 0, got.stderr
    again = pool_lab.rbees(
        "pool", "models", "download", "tiny", "--from", str(tiny_llama), "--force", "--json", "--host", "a"
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["id"] == "tiny"
    listed = json.loads(pool_lab.rbees("pool", "models", "list", "--host", "a", "--json").stdout)
    assert [m["id"] for m in listed] == ["tiny"]

    spawned = pool_lab.rbees(
        "pool", "worker", "spawn", "cpu", "--model", "tiny", "--host", "a", "--threads", "1",
        "--refill-wait", "0.5", "--prefill-gather", "0.25", "--timeout", "120", "--json", timeout=180,
    )  # fmt: skip
    assert spawned.returncode == 0, spawned.stderr
    record = json.loads(spawned.stdout)
    assert record["model_id"] == "tiny" and record["backend"] == "cpu"
    assert get_json(f"{record['uri']}/health")["status"] == "healthy"
    assert psutil.pid_exists(record["pid"])
    cmdline = psutil.Process(record["pid"]).cmdline()
    assert cmdline[cmdline.index("--refill-wait") + 1] == "0.5"  # the worker tuning reached the worker
    assert cmdline[cmdline.index("--prefill-gather") + 1] == "0.25"
    assert "--prefill-batch-tokens" not in cmdline  # and what was not given stays its default

    workers = pool_lab.rbees("pool", "worker", "list", "--host", "a", "--host", "b", "--json")
    assert workers.returncode == 0, workers.stderr
    rows = json.loads(workers.stdout)
    assert [(r["host"], r["worker_id"]) for r in rows] == [("a", record["worker_id"])]
    table = pool_lab.rbees("pool", "worker", "list", "--host", "a")
    assert record["worker_id"] in table.stdout

    # the worker's token, for calling it directly: it is the one the worker checks
    token = pool_lab.rbees("pool", "worker", "token", record["worker_id"], "--host", "a")
    assert token.returncode == 0, token.stderr
    address = record["uri"].removeprefix("http://")
    greedy = ["-p", "Hi", "-n", "3", "-t", "0"]
    direct = pool_lab.rbees("infer", "--worker", address, "--token", token.stdout.strip(), *greedy)
    assert direct.returncode == 0 and direct.stdout.strip(), direct.stderr
    denied = pool_lab.rbees("infer", "--worker", address, "--token", "wrong", *greedy)
    assert denied.returncode == 1 and "UNAUTHORIZED" in denied.stderr
    unknown = pool_lab.rbees("pool", "worker", "token", "no-such-worker", "--host", "a")
    assert unknown.returncode != 0 and "unknown worker" in unknown.stderr and unknown.stdout == ""

    stopped = pool_lab.rbees("pool", "worker", "stop", record["worker_id"], "--timeout", "5", "--host", "a")
    assert stopped.returncode == 0, stopped.stderr
    assert (
        not psutil.pid_exists(record["pid"]) or psutil.Process(record["pid"]).status() == psutil.STATUS_ZOMBIE
    )
    assert json.loads(pool_lab.rbees("pool", "worker", "list", "--host", "a", "--json").stdout) == []
    pruned = pool_lab.rbees("pool", "worker", "prune", "--json", "--host", "a")
    assert pruned.returncode == 0 and json.loads(pruned.stdout) == []
    none = pool_lab.rbees("pool", "worker", "stop-all", "--timeout", "1", "--host", "a")
    assert none.returncode == 0, none.stderr
