"""One command on many hosts at once: ``[host] ``-prefixed live lines and a per-host summary.

With one host, output passes through untouched. All hosts run concurrently (bounded by
``MAX_PARALLEL``) in one asyncio loop, so the wall time is that of the slowest host, not the sum.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import BinaryIO

from rbees.ctl.inventory import Target
from rbees.ctl.remote import OutputSink, RemoteResult, run_remote
from rbees.ctl.ssh import SshSettings

MAX_PARALLEL = 32


class PassthroughSink:
    """Lines go to our stdout / stderr as they are."""

    def __init__(self, out: BinaryIO, err: BinaryIO) -> None:
        self._out = out
        self._err = err

    def out(self, line: bytes) -> None:
        self._out.write(line)
        self._out.flush()

    def err(self, line: bytes) -> None:
        self._err.write(line)
        self._err.flush()


class PrefixSink:
    """Every line gets a ``[label] `` prefix, so interleaved hosts stay readable."""

    def __init__(self, prefix: str, out: BinaryIO, err: BinaryIO) -> None:
        self._prefix = prefix.encode()
        self._out = out
        self._err = err

    def out(self, line: bytes) -> None:
        self._write(self._out, line)

    def err(self, line: bytes) -> None:
        self._write(self._err, line)

    def _write(self, stream: BinaryIO, line: bytes) -> None:
        stream.write(self._prefix + line + (b"" if line.endswith(b"\n") else b"\n"))
        stream.flush()


def line_prefixes(targets: Sequence[Target]) -> list[str]:
    """``[label] `` padded to one width, so the prefixed output lines up."""
    width = max((len(t.label) for t in targets), default=0)
    return [f"[{t.label}]".ljust(width + 2) + " " for t in targets]


async def run_many(
    targets: Sequence[Target],
    script_for: Callable[[Target], str],
    *,
    ssh: SshSettings,
    out: BinaryIO,
    err: BinaryIO,
    program: Callable[[Target], str],
    capture_stdout: bool = False,
    max_time: float | None = None,
) -> list[RemoteResult]:
    """Run each target's script concurrently; results come back in the order of ``targets``.

    ``program`` names the remote command of a target, for the 'not found' message.
    """
    gate = asyncio.Semaphore(MAX_PARALLEL)
    single = len(targets) == 1

    async def one(target: Target, prefix: str) -> RemoteResult:
        sink: OutputSink = PassthroughSink(out, err) if single else PrefixSink(prefix, out, err)
        async with gate:
            return await run_remote(
                target,
                script_for(target),
                ssh=ssh,
                sink=sink,
                program=program(target),
                capture_stdout=capture_stdout,
                max_time=max_time,
            )

    runs = (one(t, prefix) for t, prefix in zip(targets, line_prefixes(targets), strict=True))
    return list(await asyncio.gather(*runs))


def summary_lines(results: Sequence[RemoteResult]) -> list[str]:
    """``ok`` / ``failed: reason`` per host, for stderr after a multi-host run."""
    width = max((len(r.target.label) for r in results), default=0)
    failed = sum(not r.ok for r in results)
    lines = [f"summary: {len(results) - failed} ok, {failed} failed"]
    for r in results:
        state = "ok" if r.failure is None else f"failed: {r.failure.message}"
        lines.append(f"  {r.target.label.ljust(width)}  {state} ({r.elapsed_s:.1f}s)")
    return lines
