"""A worker's life on the tiny Qwen2 model: loading, ready callback, auth, SIGTERM drain."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import free_port
from tests.worker.helpers import EventStream, Worker, execute, request, run_worker, terminal

TOKEN = "s3cret-worker-token"
CALLBACK_TOKEN = "callback-token"


class CallbackListener:
    """A real HTTP server that records the ready callbacks it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], dict[str, Any]]] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                listener.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v2/workers/register"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, timeout: float = 30.0) -> tuple[dict[str, str], dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while not self.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.received, "no ready callback arrived"
        return self.received[0]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener() -> Iterator[CallbackListener]:
    cb = CallbackListener()
    yield cb
    cb.close()


def _wait_for_http(worker: Worker, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.proc.poll() is None, worker.proc.log_text()
        try:
            return dict(request(f"{worker.url}/health")[2])
        except OSError:
            time.sleep(0.02)
    raise AssertionError("the worker never answered /health")


def _wait_status(worker: Worker, status: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = dict(request(f"{worker.url}/health")[2])
        if health["status"] == status:
            return health
        assert worker.proc.poll() is None, worker.proc.log_text()
        time.sleep(0.05)
    raise AssertionError(f"worker never became {status}")


def test_worker_life_loading_callback_auth_and_sigterm_drain(
    tiny_qwen: Path, tmp_path: Path, listener: CallbackListener
) -> None:
    dead_url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    flags = ["--callback-url", dead_url, "--callback-url", listener.url, "--callback-token", CALLBACK_TOKEN]
    flags += ["--pool", "pool-a", "--advertise-url", "http://gpu-box.lan:8123", "--model-id", "tiny"]
    with run_worker(tiny_qwen, tmp_path, *flags, worker_id="w-life", token=TOKEN, wait=False) as worker:
        # The HTTP server answers while the model loads; jobs are refused with a retriable 503.
        first = _wait_for_http(worker)
        assert first["status"] == "loading" and first["slots_busy"] == 0
        status, headers, body = request(
            f"{worker.url}/execute", "POST", {"job_id": "early", "prompt": "Hi"}, worker.headers()
        )
        assert status == 503 and body["error"]["code"] == "MODEL_LOADING"
        assert int(headers["retry-after"]) >= 1

        health = _wait_status(worker, "healthy")
        assert health["model"] == "tiny"

        # Ready callback: the registration, with the callback token; the dead URL hurts nobody.
        headers, registration = listener.wait()
        assert headers["authorization"] == f"Bearer {CALLBACK_TOKEN}"
        assert registration == {
            "worker_id": "w-life",
            "uri": "http://gpu-box.lan:8123",
            "model_ref": "tiny",
            "backend": "cpu",
            "device": "cpu",
            "vram_bytes": health["vram_bytes"],
            "slots_total": 1,
            "pool": "pool-a",
            "token": TOKEN,
        }

        # Auth: /health is open, /execute and /cancel need the bearer token.
        for path, body in (("/execute", {"job_id": "a", "prompt": "Hi"}), ("/cancel", {"job_id": "a"})):
            for hdrs in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                status, resp_headers, payload = request(f"{worker.url}{path}", "POST", body, hdrs)
                assert status == 401 and payload["error"]["code"] == "UNAUTHORIZED", (path, hdrs)
                assert resp_headers["www-authenticate"] == "Bearer"
        assert terminal(execute(worker, job_id="authed", prompt="Hi", max_tokens=3))["type"] == "end"
        assert worker.proc.poll() is None

        # SIGTERM: the running job still ends on its own (not cancelled), then exit 0.
        with EventStream(
            worker, {"job_id": "drain-1", "prompt": "Once", "max_tokens": 120, "temperature": 0}
        ) as stream:
            events = iter(stream)
            assert next(events)["type"] == "started"
            worker.proc.signal(signal.SIGTERM)
            end = terminal(list(events))
        assert end["stop_reason"] == "MAX_TOKENS"  # greedy: no early EOS on the tiny model
        assert worker.proc.wait(30) == 0
        assert "retry" in worker.proc.log_text()
