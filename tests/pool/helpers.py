"""Running ``rbees-pool`` in tests, and the stub worker for failure modes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from tests.support.procs import bin_path

STUB_WORKERD = Path(__file__).with_name("stub_workerd.py")


def first_port_at(home: Path, port: int) -> int:
    """Make the pool hand out worker ports from ``port`` up (tests never use the fixed 8001)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "pool.toml").write_text(f"first_port = {port}\n")
    return port


def worker_processes(home: Path) -> list[psutil.Process]:
    """Live worker processes serving a model of this pool home."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or "--worker-id" not in cmd:
            continue
        if any(arg.startswith(str(home)) for arg in cmd):
            found.append(proc)
    return found


def register_local(model_id: str, source: Path, arch: str = "llama") -> None:
    """Register ``model_id`` and install it from a local directory or GGUF file."""
    rbees_pool(
        "models",
        "register",
        "--id",
        model_id,
        "--name",
        model_id,
        "--repo",
        f"local/{model_id}",
        "--architecture",
        arch,
        check=True,
    )
    rbees_pool("models", "download", model_id, "--from", str(source), check=True)


def rbees_pool(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``rbees-pool`` with the test's environment (plus ``env``)."""
    done = subprocess.run(
        [bin_path("rbees-pool"), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"rbees-pool {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


def stub_env(mode: str = "ok", **extra: str) -> dict[str, str]:
    """Environment that makes ``rbees-pool`` start the stub worker instead of ``rbees-workerd``."""
    return {"RBEES_WORKERD": f"{sys.executable} {STUB_WORKERD}", "STUB_MODE": mode, **extra}
