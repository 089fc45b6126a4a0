"""Real ``rbees-orcd`` and ``rbees-workerd`` processes on tiny models, and small HTTP helpers."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.procs import ManagedProcess, bin_path, free_port, wait_http

LOOPBACK = "127.0.0.1"


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


def call(
    url: str,
    method: str = "GET",
    body: Any = None,
    token: str | None = None,
    timeout: float = 10.0,
    raw: bytes | None = None,
) -> Reply:
    """One request (JSON body, or ``raw`` bytes); error statuses are returned, not raised.

    A JSON reply is decoded; anything else is returned as text.
    """
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(
                resp.status,
                _decode(resp.read(), resp.headers),
                {k.lower(): v for k, v in resp.headers.items()},
            )
    except urllib.error.HTTPError as err:
        return Reply(
            err.code, _decode(err.read(), err.headers), {k.lower(): v for k, v in err.headers.items()}
        )


def _decode(raw: bytes, headers: Any) -> Any:
    if not raw:
        return None
    if "json" in headers.get("Content-Type", ""):
        return json.loads(raw)
    return raw.decode()


@dataclass
class Orcd:
    url: str
    proc: ManagedProcess
    state_dir: Path
    token: str | None = None

    def call(
        self,
        path: str,
        method: str = "GET",
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
    ) -> Reply:
        """``token`` overrides the default one; ``""`` sends none."""
        return call(self.url + path, method, body, self.token if token is None else token or None, raw=raw)

    def submit(self, **task: Any) -> Reply:
        return self.call("/v2/tasks", "POST", task)

    def task(self, job_id: str) -> dict[str, Any]:
        reply = self.call(f"/v2/tasks/{job_id}")
        assert reply.status == 200, reply.body
        return dict(reply.body)

    def workers(self) -> dict[str, dict[str, Any]]:
        return {w["worker_id"]: w for w in self.call("/v2/workers").body["workers"]}

    def wait_task(
        self, job_id: str, timeout: float = 60.0, until: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Poll until the job reaches one of ``until`` (default: any finished state)."""
        states = until or ("completed", "failed", "cancelled")
        deadline = time.monotonic() + timeout
        while True:
            info = self.task(job_id)
            if info["status"] in states or time.monotonic() > deadline:
                assert info["status"] in states, info
                return info
            time.sleep(0.05)

    def wait_workers(self, expect: dict[str, str], timeout: float = 120.0) -> dict[str, dict[str, Any]]:
        """Wait until each named worker is listed with the given status."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rbees-orcd exited: {self.proc.log_text()[-3000:]}")
            workers = self.workers()
            if all(workers.get(w, {}).get("status") == s for w, s in expect.items()):
                return workers
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not {expect} after {timeout}s: {workers}")
            time.sleep(0.1)


@contextmanager
def run_orcd(
    state_dir: Path, *args: str, port: int | None = None, token: str | None = None
) -> Iterator[Orcd]:
    port = port or free_port()
    argv = [bin_path("rbees-orcd"), "--port", str(port), "--state-dir", str(state_dir), *args]
    if token:
        argv += ["--api-token", token]
    log = state_dir.parent / f"orcd-{state_dir.name}-{port}.log"
    with ManagedProcess(argv, log=log) as proc:
        url = f"http://{LOOPBACK}:{port}"
        wait_http(url + "/health", timeout=60, proc=proc)
        yield Orcd(url, proc, state_dir, token)


@dataclass
class Worker:
    worker_id: str
    url: str
    proc: ManagedProcess


@contextmanager
def run_worker(
    model: Path,
    worker_id: str,
    log_dir: Path,
    *,
    model_id: str | None = None,
    callback: str | None = None,
    callback_token: str | None = None,
    token: str | None = None,
    slots: int = 1,
) -> Iterator[Worker]:
    port = free_port()
    argv = [
        bin_path("rbees-workerd"),
        "--worker-id",
        worker_id,
        "--model",
        str(model),
        "--port",
        str(port),
        "--slots",
        str(slots),
        "--threads",
        "1",
    ]
    if model_id:
        argv += ["--model-id", model_id]
    if callback:
        argv += ["--callback-url", callback]
    if callback_token:
        argv += ["--callback-token", callback_token]
    if token:
        argv += ["--token", token]
    with ManagedProcess(argv, log=log_dir / f"{worker_id}.log") as proc:
        yield Worker(worker_id, f"http://{LOOPBACK}:{port}", proc)


def wait_worker_ready(worker: Worker, timeout: float = 180.0) -> dict[str, Any]:
    body: dict[str, Any] = wait_http(
        worker.url + "/health", timeout=timeout, until="healthy", proc=worker.proc
    )
    return body


# --- SSE ---------------------------------------------------------------------------------------------


@dataclass
class Event:
    id: int
    data: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.data["type"])


async def sse(resp: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """Parse an SSE response into events (with their ``id``)."""
    buf = b""
    event_id: int | None = None
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            data = None
            for line in block.decode().split("\n"):
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
            if data is not None:
                assert event_id is not None
                yield Event(event_id, data)


async def stream_task(
    session: aiohttp.ClientSession, orcd: Orcd, task: dict[str, Any], token: str | None = None
) -> list[Event]:
    """Submit with ``Accept: text/event-stream`` and collect every event."""
    headers = {"Accept": "text/event-stream"}
    if token or orcd.token:
        headers["Authorization"] = f"Bearer {token or orcd.token}"
    async with session.post(orcd.url + "/v2/tasks", json=task, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return [e async for e in sse(resp)]


async def follow(
    session: aiohttp.ClientSession, orcd: Orcd, job_id: str, last_event_id: int | None = None
) -> list[Event]:
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    async with session.get(f"{orcd.url}/v2/tasks/{job_id}/events", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return [e async for e in sse(resp)]


def check_event_log(events: list[Event]) -> None:
    """Ids 1..n without gaps, ``queued`` first, exactly one terminal event, and it is last."""
    assert [e.id for e in events] == list(range(events[0].id, events[0].id + len(events)))
    terminals = [e for e in events if e.type in ("end", "error")]
    assert len(terminals) == 1 and events[-1] is terminals[0], [e.data for e in events]
