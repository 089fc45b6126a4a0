"""Real subprocesses and ports for tests: free ports, waiting for HTTP, group-killed processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

VENV_BIN = Path(sys.executable).parent


def bin_path(name: str) -> str:
    """Path of a console script installed next to the running interpreter."""
    return str(VENV_BIN / name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def get_json(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_http(url: str, timeout: float = 60.0, *, until: str | None = None, proc: Any = None) -> Any:
    """Poll ``url`` until it answers 200 (and, with ``until``, its JSON ``status`` equals it)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        code = proc.poll() if proc is not None else None
        if code is not None:
            tail = proc.log_text()[-3000:] if hasattr(proc, "log_text") else ""
            raise RuntimeError(f"process exited with {code} while waiting for {url}\n{tail}")
        try:
            body = get_json(url)
            if until is None or body.get("status") == until:
                return body
            last = body
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last})")


class ManagedProcess:
    """A subprocess in its own session; leaving the ``with`` kills its whole process group."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ManagedProcess:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(self.log, "ab")) if self.log else subprocess.DEVNULL
            self.proc = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.cwd,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        # Children may outlive the leader; sweep the group either way.
        self.signal(signal.SIGKILL)
