"""``rbees-workerd``: check the settings and model, bind the port, serve, drain on SIGTERM.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 when the worker cannot start (bad flags,
a non-loopback bind without a token, a missing/corrupt/unsafe model, an absent backend, a port
in use, a model that fails to load), 1 if the server itself dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence

import uvicorn

from rbees.worker.engines.base import Engine
from rbees.worker.modelfiles import ModelFileError, ModelSource, inspect_model_path
from rbees.worker.settings import WorkerSettings, settings_from_args

log = logging.getLogger("rbees.worker")

EXIT_OK, EXIT_SERVER_DIED, EXIT_CANNOT_START = 0, 1, 2
_SHUTDOWN_GRACE_S = 5
_GIL_SWITCH_INTERVAL_S = 0.001


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the worker drains first, then stops the server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    # Until the server installs its own handlers, SIGTERM simply means: stop now, cleanly.
    signal.signal(signal.SIGTERM, _exit_now)
    try:
        settings = settings_from_args(argv)
    except ValueError as exc:
        return _cannot_start(f"invalid settings: {exc}")
    if not settings.binds_loopback and not settings.token:
        return _cannot_start(
            f"refusing to bind {settings.host} without a token: pass --token or set RBEES_WORKER_TOKEN "
            "(or bind 127.0.0.1)"
        )
    try:
        source = inspect_model_path(settings.model_path)
    except ModelFileError as exc:
        return _cannot_start(str(exc))
    try:
        sock = _bind(settings.host, settings.port)
    except OSError as exc:
        return _cannot_start(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")
    # torch is imported only now, so the checks above answer fast.
    import torch

    from rbees.worker.engines.devices import DeviceError, resolve_device

    if settings.threads:
        torch.set_num_threads(settings.threads)
    # The decode thread holds the GIL for most of a GPU forward pass (launching its kernels); the
    # event loop, to admit a request, waits for the interpreter to make it let go: 5 ms by default,
    # several times per request. A millisecond keeps admissions prompt at a negligible cost.
    sys.setswitchinterval(_GIL_SWITCH_INTERVAL_S)
    try:
        device = resolve_device(settings.backend, settings.gpu)
    except DeviceError as exc:
        sock.close()
        return _cannot_start(str(exc))
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        code = runner.run(_serve(settings, source, device, sock))
    # Skip interpreter teardown: it takes seconds with torch loaded, and a model load still
    # running in its thread could not be interrupted anyway. Nothing is left to flush but logs.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (it is with uvicorn[standard]): less time per request and per
    token on the loop, which shares the GIL with the decode thread."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _exit_now(signum: int, frame: object) -> None:
    raise SystemExit(EXIT_OK)


def _cannot_start(message: str) -> int:
    print(f"rbees-workerd: error: {message}", file=sys.stderr)
    return EXIT_CANNOT_START


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _engine_loader(settings: WorkerSettings, source: ModelSource, device: str) -> Engine:
    from rbees.worker.engines.transformers_engine import TransformersEngine

    return TransformersEngine.load(source, device, settings.cache_dir)


async def _serve(settings: WorkerSettings, source: ModelSource, device: str, sock: socket.socket) -> int:
    """Serve until stopped or the model fails to load; return the exit code."""
    from rbees.worker.app import create_app
    from rbees.worker.runtime import WorkerRuntime

    model_name = settings.model_id or source.default_name
    app = create_app(
        settings, lambda: _engine_loader(settings, source, device), device=device, model_name=model_name
    )
    runtime: WorkerRuntime = app.state.runtime
    config = uvicorn.Config(
        app,
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # nothing here uses the client's address; one middleware layer less
        http="httptools",
        log_level="warning",
        timeout_graceful_shutdown=_SHUTDOWN_GRACE_S,
        timeout_keep_alive=30,
    )
    server = _Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            runtime.cancel_all()  # a second signal: stop waiting for running jobs
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    log.info("worker %s listening on %s, loading %s", settings.worker_id, settings.uri, source.path)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    stopping = asyncio.create_task(stop.wait())
    failing = asyncio.create_task(runtime.load_failed.wait())
    await asyncio.wait({serving, stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        stopping.cancel()
        failing.cancel()
        serving.result()
        return EXIT_SERVER_DIED
    if failing.done():
        code = EXIT_CANNOT_START
        print(f"rbees-workerd: error: {runtime.error}", file=sys.stderr)
    else:
        log.info("stopping: draining running jobs (up to %.0fs)", settings.drain_timeout_s)
        await runtime.drain(settings.drain_timeout_s)
        code = EXIT_OK
    stopping.cancel()
    failing.cancel()
    server.should_exit = True
    await serving
    log.info("worker %s stopped", settings.worker_id)
    return code
