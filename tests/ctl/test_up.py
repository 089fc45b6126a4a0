"""`rbees up`: a whole local cluster from one command, and nothing left behind when it stops."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.support.procs import ManagedProcess, bin_path, free_port, get_json, port_in_use

RBEES = bin_path("rbees")


def processes_using(home: Path) -> list[str]:
    """Command lines of live processes that mention ``home`` (what `rbees up` started lives there)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(home) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(cmdline)
        except psutil.Error:
            continue
    return found


def pool(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RBEES_HOME": str(home)}
    return subprocess.run(
        [bin_path("rbees-pool"), *args], env=env, capture_output=True, text=True, check=True
    )


def worker_port(stderr: str) -> int:
    match = re.search(r"worker\s+\S+ at http://127\.0\.0\.1:(\d+)", stderr)
    assert match, stderr
    return int(match.group(1))


def assert_nothing_left(home: Path, *ports: int) -> None:
    deadline = time.monotonic() + 10
    while (processes_using(home) or any(port_in_use(p) for p in ports)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_using(home) == []
    assert [p for p in ports if port_in_use(p)] == []


def test_up_prompt_answers_with_the_embedded_model(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    done = subprocess.run(
        [RBEES, "up", "--home", str(home), "--port", str(port), "--max-tokens", "24",
         "--prompt", "What is the capital of France?"],
        capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "rbees is up" in done.stderr and "curl" in done.stderr and "tok/s" in done.stderr
    assert "rbees is up" not in done.stdout  # only the answer goes to stdout
    assert (home / "models" / "smollm2-135m").is_dir()
    assert_nothing_left(home, port, worker_port(done.stderr))


@pytest.fixture
def tiny_home(tmp_path: Path, tiny_llama: Path) -> Path:
    """A pool home that already holds the tiny model as ``tiny`` (fast to load)."""
    home = tmp_path / "home"
    register = [
        "register",
        "--id",
        "tiny",
        "--name",
        "Tiny",
        "--repo",
        "test/tiny",
        "--architecture",
        "llama",
    ]
    for args in (register, ["download", "tiny", "--from", str(tiny_llama)]):
        pool(home, "models", *args)
    return home


def test_up_serves_until_ctrl_c_then_leaves_nothing(tiny_home: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    command = [RBEES, "up", "--home", str(tiny_home), "--port", str(port), "--model", "tiny"]
    with ManagedProcess(command, log=log) as up:
        deadline = time.monotonic() + 180
        while "press Ctrl-C" not in up.log_text():
            assert up.poll() is None, up.log_text()
            assert time.monotonic() < deadline, up.log_text()
            time.sleep(0.2)
        health = get_json(f"http://127.0.0.1:{port}/health")
        assert health["workers"] == 1
        up.signal(signal.SIGINT)
        assert up.wait(60) == 0, up.log_text()
    text = log.read_text()
    assert "stopped everything" in text
    assert_nothing_left(tiny_home, port, worker_port(text))
    listed = pool(tiny_home, "worker", "list", "--json")
    assert listed.stdout.strip() in ("[]", "")


def test_up_fails_clearly_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [RBEES, "up", "--home", str(tmp_path / "home"), "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"port {port}" in done.stderr and "--port" in done.stderr
    assert processes_using(tmp_path) == []
