"""A one-shot HTTP listener in the CLI that receives a new worker's ready callback.

It listens on 127.0.0.1 on an ephemeral port under an unguessable path, accepts exactly one
``WorkerRegistration`` for the expected worker id, and is closed as soon as spawn is done.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from pydantic import ValidationError

from rbees.protocol import WorkerRegistration

MAX_BODY = 64 * 1024


class ReadyListener:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._path = f"/ready/{secrets.token_urlsafe(16)}"
        self._got: queue.Queue[WorkerRegistration] = queue.Queue()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ready-listener", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{self._path}"

    def wait(self, timeout: float) -> WorkerRegistration | None:
        try:
            return self._got.get(timeout=timeout)
        except queue.Empty:
            return None

    def __enter__(self) -> ReadyListener:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != listener._path:
                    self._reply(404, {"error": {"code": "NOT_FOUND", "message": "no such path"}})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    self._reply(400, {"error": {"code": "INVALID_REQUEST", "message": "bad body size"}})
                    return
                try:
                    reg = WorkerRegistration.model_validate_json(self.rfile.read(length))
                except ValidationError as exc:
                    self._reply(400, {"error": {"code": "INVALID_REQUEST", "message": str(exc)[:500]}})
                    return
                if reg.worker_id != listener.worker_id:
                    self._reply(403, {"error": {"code": "FORBIDDEN", "message": "unexpected worker id"}})
                    return
                listener._got.put(reg)
                self._reply(200, {"registered": True, "worker_id": reg.worker_id})

            def _reply(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                return None

        return Handler
