"""``rbees-pool serve``: the optional pool-manager daemon (HTTP, default 127.0.0.1:9200).

It only reports what the CLI already knows and takes the workers' ready callbacks; it stays dumb:
it never spawns, stops or routes. Routes:

- ``GET /health`` -> ``{"status": "healthy", "workers": N, "gpus": M}``, always open.
- ``GET /workers`` -> what ``rbees-pool worker list --json`` prints, plus ``ready_at``.
- ``GET /status`` -> what ``rbees-pool status --json`` prints, each worker with ``ready_at``.
- ``POST /callback`` -> a worker's ready callback (``WorkerRegistration``); 202.

A non-loopback bind needs a token (``--token`` or ``RBEES_POOL_TOKEN``); with a token every route
but ``/health`` needs ``Authorization: Bearer <token>``. Errors use the rbees error envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import logging
import signal
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rbees.httpd import install_error_handlers, invalid_request
from rbees.pool.catalog import now_iso
from rbees.pool.errors import Conflict, InvalidInput
from rbees.pool.records import process_alive, read_records
from rbees.pool.settings import PoolSettings
from rbees.pool.status import apple_mps, nvidia_gpus, pool_status
from rbees.pool.workers import WorkerView, list_workers
from rbees.protocol import ErrorCode, RbeesError, WorkerRegistration

log = logging.getLogger("rbees.pool.daemon")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9200
MAX_CALLBACK_BODY = 64 * 1024
MAX_READY_ENTRIES = 4096


class DaemonSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pool: PoolSettings
    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    token: str | None = Field(default=None, repr=False)

    @property
    def binds_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check(self) -> None:
        """Refuse, before binding anything, what would be unsafe."""
        if self.token is not None and not self.token.strip():
            raise InvalidInput("the pool token is empty")
        if not self.binds_loopback and not self.token:
            raise InvalidInput(
                f"refusing to bind {self.host} without a token: pass --token or set RBEES_POOL_TOKEN "
                "(or bind 127.0.0.1)"
            )


class ReadyBook:
    """When each worker last reported ready (in memory only, bounded, oldest entries dropped)."""

    def __init__(self, limit: int = MAX_READY_ENTRIES) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._ready_at: OrderedDict[str, str] = OrderedDict()

    def mark(self, worker_id: str) -> str:
        at = now_iso()
        with self._lock:
            self._ready_at.pop(worker_id, None)
            self._ready_at[worker_id] = at
            while len(self._ready_at) > self._limit:
                self._ready_at.popitem(last=False)
        return at

    def get(self, worker_id: str) -> str | None:
        with self._lock:
            return self._ready_at.get(worker_id)


# ---------------------------------------------------------------- facts


@functools.cache
def _has_mps() -> bool:
    return apple_mps()


def gpu_count() -> int:
    """GPUs this machine offers: NVIDIA GPUs through NVML (as ``rbees-pool status`` lists them),
    or Apple silicon's one Metal GPU."""
    return len(nvidia_gpus()) + (1 if _has_mps() else 0)


def live_worker_count(settings: PoolSettings) -> int:
    """Workers of the runtime records whose process still runs."""
    return sum(1 for r in read_records(settings) if process_alive(r))


def _with_ready(view: dict[str, Any], ready: ReadyBook) -> dict[str, Any]:
    """``ready_at``: the last ready callback this daemon took for the worker, else the time the
    spawning CLI recorded (a spawned worker calls back to its spawner, not to the daemon)."""
    return view | {"ready_at": ready.get(str(view.get("worker_id"))) or view.get("ready_at")}


# ---------------------------------------------------------------- app


def _settings(request: Request) -> DaemonSettings:
    value: DaemonSettings = request.app.state.settings
    return value


def _ready(request: Request) -> ReadyBook:
    value: ReadyBook = request.app.state.ready
    return value


def require_token(request: Request) -> None:
    expected = _settings(request).token
    if not expected:
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    ok = hmac.compare_digest(presented.strip().encode(), expected.encode())
    if scheme.lower() != "bearer" or not ok:
        raise RbeesError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RbeesError(ErrorCode.INVALID_REQUEST, f"the body must be at most {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RbeesError(ErrorCode.INVALID_REQUEST, f"the body must be at most {limit} bytes")
    return bytes(body)


def create_app(settings: DaemonSettings) -> FastAPI:
    """The pool-manager app; handlers are thin wrappers over the pool's status and records code."""
    app = FastAPI(title="rbees pool manager", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.ready = ReadyBook()
    install_error_handlers(app)

    @app.get("/health")
    def health(request: Request) -> dict[str, Any]:
        pool = _settings(request).pool
        return {"status": "healthy", "workers": live_worker_count(pool), "gpus": gpu_count()}

    guarded = APIRouter(dependencies=[Depends(require_token)])

    @guarded.get("/workers")
    def workers(request: Request) -> list[dict[str, Any]]:
        views: list[WorkerView] = list_workers(_settings(request).pool)
        ready = _ready(request)
        return [_with_ready(v.public(), ready) for v in views]

    @guarded.get("/status")
    def status(request: Request) -> dict[str, Any]:
        data, _ = pool_status(_settings(request).pool)
        ready = _ready(request)
        data["workers"] = [_with_ready(w, ready) for w in data["workers"]]
        return data

    @guarded.post("/callback", status_code=202)
    async def callback(request: Request) -> dict[str, Any]:
        raw = await _read_body(request, MAX_CALLBACK_BODY)
        try:
            reg = WorkerRegistration.model_validate_json(raw)
        except ValidationError as exc:
            raise invalid_request(exc.errors()) from None
        ready_at = _ready(request).mark(reg.worker_id)
        log.info("worker %s reported ready at %s", reg.worker_id, reg.uri)
        return {"worker_id": reg.worker_id, "accepted": True, "ready_at": ready_at}

    app.include_router(guarded)
    return app


# ---------------------------------------------------------------- serving


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (it would re-raise the signal on the way out)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise InvalidInput(f"cannot resolve --host {host!r}: {exc.strerror or exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise Conflict(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


async def _serve(app: FastAPI, sock: socket.socket) -> None:
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning", timeout_keep_alive=30)
    server = _Server(config)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop)
    await server.serve(sockets=[sock])


def serve(settings: DaemonSettings, *, say: Callable[[str], None] | None = None) -> None:
    """Check the settings, bind, serve until SIGTERM / SIGINT / SIGHUP; return normally (exit 0).

    Raises ``InvalidInput`` (exit 2) for an unsafe or bad setting, ``Conflict`` (exit 4) for a port
    that cannot be bound.
    """
    settings.check()
    sock = _bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    app = create_app(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    if say is not None:
        auth = "token required except /health" if settings.token else "no token"
        say(f"pool manager listening on http://{host}:{port} ({auth}; home {settings.pool.home})")
    # The CLI turns SIGTERM / SIGHUP into KeyboardInterrupt; one arriving outside the event
    # loop's own handlers is a clean stop too.
    with sock, contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(app, sock))
