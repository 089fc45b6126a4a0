"""Run one command on one host through ``ssh``: live output, exit code passed through, never a hang.

The remote shell first prints a marker on stderr, so the runner knows which stderr lines come from the
ssh client (held back, and turned into one clear line if the connection fails) and which from the
remote command (streamed as they come). A connect timeout, server keep-alives and an optional overall
``max_time`` bound every run; the ssh process is killed on timeout or cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from rbees.ctl.inventory import Target
from rbees.ctl.ssh import (
    CONNECTED_MARKER,
    Failure,
    FailureKind,
    SshSettings,
    classify_failure,
    ssh_argv,
    wrap_remote,
)

_STREAM_LIMIT = 64 * 1024 * 1024
_DRAIN_GRACE_S = 2.0
_POLL_S = 0.02
_TAIL_LINES = 40
_MARKER = CONNECTED_MARKER.encode()
# Chatter from connection sharing that says nothing about the remote command.
_BENIGN_SSH_LINES = (b"ControlSocket", b"disabling multiplexing", b"Control socket connect")


class OutputSink(Protocol):
    """Where a run's lines go as they arrive (each ends with a newline, except maybe the last)."""

    def out(self, line: bytes) -> None: ...

    def err(self, line: bytes) -> None: ...


@dataclass(frozen=True)
class RemoteResult:
    target: Target
    exit_code: int
    failure: Failure | None
    stdout: bytes
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass
class _StderrState:
    connected: bool = False
    ssh_lines: list[bytes] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=_TAIL_LINES))


async def run_remote(
    target: Target,
    script: str,
    *,
    ssh: SshSettings,
    sink: OutputSink,
    program: str,
    capture_stdout: bool = False,
    max_time: float | None = None,
) -> RemoteResult:
    """Run ``script`` (already quoted for the remote shell) on ``target``.

    With ``capture_stdout`` the remote stdout is returned in the result instead of going to ``sink``.
    """
    if max_time is not None:
        # A connection of its own: killing ssh then ends the remote session too (a shared master would
        # keep the session, and our pipes, alive until the remote command finished).
        ssh = replace(ssh, control_dir=None)
    argv = ssh_argv(target, wrap_remote(script, target.env), ssh)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=_STREAM_LIMIT,
    )
    if proc.stdout is None or proc.stderr is None:
        raise RuntimeError("ssh started without pipes")
    captured = bytearray()
    state = _StderrState()
    out_task = asyncio.create_task(_pump(proc.stdout, captured.extend if capture_stdout else sink.out))
    err_task = asyncio.create_task(_pump(proc.stderr, lambda line: _on_stderr(line, state, sink)))
    timed_out = False
    try:
        try:
            rc = await asyncio.wait_for(_exit_code(proc), max_time)
        except TimeoutError:
            timed_out = True
            _kill(proc)
            rc = await _exit_code(proc)
        # Normally both pipes are at EOF by now; a remote daemon holding them must not hang us.
        _done, pending = await asyncio.wait({out_task, err_task}, timeout=_DRAIN_GRACE_S)
        for task in pending:
            task.cancel()
    finally:
        if proc.returncode is None:
            _kill(proc)
        for task in (out_task, err_task):
            task.cancel()
    failure: Failure | None
    if timed_out:
        failure = Failure(
            FailureKind.TIMED_OUT, f"timed out after {max_time:g}s (--max-time); ssh was killed"
        )
    else:
        failure = classify_failure(
            target,
            rc,
            connected=state.connected,
            ssh_stderr=[b.decode(errors="replace") for b in state.ssh_lines],
            remote_stderr=list(state.tail),
            program=program,
        )
    if failure is None and not state.connected:
        _flush_held(state, sink)
    exit_code = 0 if failure is None else (rc if failure.kind is FailureKind.EXIT else failure.exit_code)
    return RemoteResult(target, exit_code, failure, bytes(captured), time.monotonic() - started)


async def _exit_code(proc: asyncio.subprocess.Process) -> int:
    """The exit status as soon as ssh exits.

    ``proc.wait()`` (Python 3.11) also waits until every pipe is closed, which a shared ssh master
    holding our pipes can delay; the return code is set at exit, and no event signals it.
    """
    while proc.returncode is None:  # noqa: ASYNC110 - see above
        await asyncio.sleep(_POLL_S)
    return proc.returncode


async def _pump(stream: asyncio.StreamReader, emit: Callable[[bytes], object]) -> None:
    while True:
        line = await stream.readline()
        if not line:
            return
        emit(line)


def _on_stderr(line: bytes, state: _StderrState, sink: OutputSink) -> None:
    if not state.connected:
        if line.rstrip(b"\r\n") == _MARKER:
            state.connected = True
            _flush_held(state, sink)
            return
        state.ssh_lines.append(line)
        return
    state.tail.append(line.decode(errors="replace"))
    sink.err(line)


def _flush_held(state: _StderrState, sink: OutputSink) -> None:
    for held in state.ssh_lines:
        if not any(benign in held for benign in _BENIGN_SSH_LINES):
            sink.err(held)
    state.ssh_lines.clear()


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
