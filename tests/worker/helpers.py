"""Helpers for driving real ``rbees-workerd`` processes: start them, stream SSE, post JSON."""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rbees.protocol import SSEParser
from tests.support.procs import ManagedProcess, bin_path, free_port, wait_http


@dataclass
class Worker:
    proc: ManagedProcess
    url: str
    log: Path
    token: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@contextlib.contextmanager
def run_worker(
    model: Path,
    home: Path,
    *extra: str,
    worker_id: str = "w-test",
    token: str | None = None,
    wait: bool = True,
    ready_timeout: float = 120.0,
) -> Iterator[Worker]:
    """Start ``rbees-workerd`` on a free port with one torch thread; wait until healthy."""
    port = free_port()
    log = home / f"{worker_id}-{port}.log"
    args = [bin_path("rbees-workerd"), "--worker-id", worker_id, "--model", str(model), "--port", str(port)]
    args += ["--threads", "1", *extra]
    if token:
        args += ["--token", token]
    env = {"RBEES_HOME": str(home), "RBEES_WORKER_TOKEN": ""}
    with ManagedProcess(args, env=env, log=log) as proc:
        worker = Worker(proc, f"http://127.0.0.1:{port}", log, token)
        if wait:
            try:
                wait_http(f"{worker.url}/health", ready_timeout, until="healthy", proc=proc.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise AssertionError(f"{exc}\n--- worker log ---\n{proc.log_text()}") from exc
        yield worker


def request(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request; returns status, headers and the parsed JSON body (or text)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, parts.path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode()
        try:
            payload: Any = json.loads(text)
        except json.JSONDecodeError:
            payload = text
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
    finally:
        conn.close()


class EventStream:
    """An open ``/execute`` stream; iterate for event dicts as they arrive."""

    def __init__(self, worker: Worker, body: dict[str, Any]) -> None:
        parts = urlsplit(worker.url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
        self.conn.request(
            "POST",
            "/execute",
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **worker.headers()},
        )
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.raw_frames: list[bytes] = []
        self._parser = SSEParser()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            line = self.resp.readline()
            if not line:
                return
            self.raw_frames.append(line)
            for msg in self._parser.feed(line):
                yield json.loads(msg.data)

    def close(self) -> None:
        """Drop the connection (what a client that goes away does)."""
        self.resp.close()
        self.conn.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def execute(worker: Worker, **body: Any) -> list[dict[str, Any]]:
    """Run one job to completion; return all its events (asserting a 200 stream)."""
    with EventStream(worker, body) as stream:
        assert stream.status == 200, stream.resp.read()
        return list(stream)


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["t"] for e in events if e["type"] == "token")


def terminal(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The single terminal event, which must be the last one."""
    ends = [e for e in events if e["type"] in ("end", "error")]
    assert len(ends) == 1 and ends[0] is events[-1], events
    return ends[0]
