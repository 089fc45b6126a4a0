"""Worker ports: from 8001 upward, never one in use by anything, never one twice.

Two spawns may run at once (two shells, two SSH sessions). Picking a port and writing the
``starting`` record that claims it happen under one file lock, so they cannot pick the same port.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

from filelock import FileLock, Timeout

from rbees.pool.errors import Conflict, PoolError
from rbees.pool.records import read_records
from rbees.pool.settings import PoolSettings

LOCK_TIMEOUT_S = 60.0


@contextlib.contextmanager
def port_lock(settings: PoolSettings) -> Iterator[None]:
    settings.ensure_dirs()
    try:
        with FileLock(settings.locks_dir / "ports.lock", timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout:
        raise PoolError("the port table is locked by another rbees-pool; try again") from None


def can_bind(port: int, host: str) -> bool:
    """Could a server (which sets SO_REUSEADDR, like uvicorn) listen on ``host:port`` right now?"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on ``port`` on the worker's address, on loopback, or on any address."""
    return all(can_bind(port, h) for h in dict.fromkeys((host, "127.0.0.1", "0.0.0.0")))


def pick_port(settings: PoolSettings, host: str, requested: int | None) -> int:
    """A port for a new worker. Call it under ``port_lock`` and claim the port before releasing."""
    claimed = {r.port: r.worker_id for r in read_records(settings)}
    if requested is not None:
        if requested in claimed:
            raise Conflict(
                f"port {requested} belongs to worker {claimed[requested]} "
                "(`rbees-pool worker prune` forgets dead workers)"
            )
        if not port_free(requested, host):
            raise Conflict(f"port {requested} is already in use on this machine")
        return requested
    for port in range(settings.first_port, 65536):
        if port not in claimed and port_free(port, host):
            return port
    raise Conflict(f"no free port from {settings.first_port} upward")


def wait_port_released(port: int, host: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if port_free(port, host):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
