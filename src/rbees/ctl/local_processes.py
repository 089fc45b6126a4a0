"""Local processes for `rbees up`: finding console scripts, ports, waiting until ready, stopping them.

Nothing here knows about the orchestrator or the SDK; :mod:`rbees.ctl.local_cluster` builds on it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

LOCAL = "127.0.0.1"


class UpError(Exception):
    """A step of `rbees up` failed; the message says which and why."""


def installed_program(name: str) -> str:
    """A console script of this installation (next to the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UpError(f"{name} is not installed (it comes with the rbees package)")
    return found


def port_is_free(port: int, host: str = LOCAL) -> bool:
    """Whether a server could listen on ``port`` now (connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_port_free(port: int, timeout: float = 5.0) -> bool:
    """Wait until ``port`` is free; False if it is still in use after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not port_is_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stderr_fd() -> int:
    """Our stderr as a file descriptor a child can write to (DEVNULL when there is none)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ("" if it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def pid_is_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group, if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_tree(pid: int) -> None:
    """Terminate a process and all its descendants; kill whatever is left after 10 s."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def poll_until_ready(
    check: Callable[[], Any],
    timeout: float,
    *,
    alive: Callable[[], bool],
    tick: Callable[[float], None],
    what: str,
    log: Path | None,
) -> Any:
    """Call ``check`` until it returns something truthy; fail if ``alive`` turns false or time runs out."""
    started = time.monotonic()
    while True:
        result = check()
        if result:
            return result
        elapsed = time.monotonic() - started
        if not alive():
            tail = log_tail(log) if log else ""
            raise UpError(
                f"{what} exited before it was ready" + (f"; its log ends with:\n{tail}" if tail else "")
            )
        if elapsed > timeout:
            raise UpError(f"{what} not ready after {timeout:.0f} s" + (f"; see {log}" if log else ""))
        tick(elapsed)
        time.sleep(0.25)
