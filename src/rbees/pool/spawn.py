"""Spawning a worker: preflight, claim a port, start ``rbees-workerd`` detached, wait for ready.

Nothing is left behind on failure: a worker that exits early, never calls back in time, or is
interrupted is killed with its whole process group and its record removed; its log stays for the
operator, and its tail is part of the error.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from rbees.pool.catalog import now_iso
from rbees.pool.errors import PoolError, SpawnFailed
from rbees.pool.ports import pick_port, port_lock
from rbees.pool.preflight import preflight
from rbees.pool.ready import ReadyListener
from rbees.pool.records import WorkerRecord, remove_record, write_record
from rbees.pool.settings import PoolSettings
from rbees.pool.stop import kill_group
from rbees.pool.workers import get_health
from rbees.protocol import Backend, WorkerRegistration

LOG_TAIL_LINES = 25
Status = Callable[[str], None]


@dataclass(frozen=True)
class SpawnRequest:
    backend: Backend
    model_id: str
    gpu: int | None = None
    port: int | None = None
    slots: int | None = None
    threads: int | None = None
    prefill_batch_tokens: int | None = None
    refill_wait: float | None = None
    prefill_gather: float | None = None
    host: str | None = None
    orchestrator: str | None = None
    orchestrator_token: str | None = None
    advertise_host: str | None = None
    timeout: float = 300.0
    check_memory: bool = True


@dataclass(frozen=True)
class Network:
    bind: str
    advertise: str

    def url(self, host: str, port: int) -> str:
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def local_url(self, port: int) -> str:
        local = "127.0.0.1" if self.bind in ("0.0.0.0", "::", "localhost") else self.bind
        return self.url(local, port)


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def plan_network(settings: PoolSettings, req: SpawnRequest) -> Network:
    """Loopback unless an off-machine orchestrator must reach the worker (it always has a token)."""
    remote = req.orchestrator is not None and not is_loopback_url(req.orchestrator)
    bind = req.host or ("0.0.0.0" if remote else "127.0.0.1")
    advertise = req.advertise_host or settings.advertise_host
    if advertise is None:
        wildcard = bind in ("0.0.0.0", "::")
        loop = req.orchestrator is not None and not remote
        advertise = ("127.0.0.1" if loop else socket.gethostname()) if wildcard else bind
    return Network(bind=bind, advertise=advertise)


def workerd_command(settings: PoolSettings) -> list[str]:
    if settings.workerd:
        return list(settings.workerd)
    beside = Path(sys.executable).parent / "rbees-workerd"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("rbees-workerd")
    if found:
        return [found]
    raise PoolError("rbees-workerd not found (install rbees here, or set RBEES_WORKERD)")


def spawn_worker(settings: PoolSettings, req: SpawnRequest, status: Status) -> WorkerRecord:
    settings.ensure_dirs()
    status("preflight checks")
    entry, model_path = preflight(settings, req)
    worker_id = f"worker-{req.backend.value}-{secrets.token_hex(4)}"
    token = secrets.token_urlsafe(32)
    net = plan_network(settings, req)
    log_path = settings.logs_dir / f"{worker_id}.log"
    base_cmd = workerd_command(settings)
    gpu = None if req.backend is Backend.CPU else (req.gpu or 0)
    with ReadyListener(worker_id) as listener:
        with port_lock(settings):
            port = pick_port(settings, net.bind, req.port)
            record = WorkerRecord(
                worker_id=worker_id,
                backend=req.backend,
                model_id=entry.id,
                port=port,
                gpu=gpu,
                started_at=now_iso(),
                uri=net.url(net.advertise, port),
                local_url=net.local_url(port),
                host=net.bind,
                token=token,
                spawner_pid=os.getpid(),
                slots=req.slots,
                log_path=str(log_path),
                model_path=str(model_path),
                orchestrator=req.orchestrator,
                orchestrator_token=req.orchestrator_token,
            )
            write_record(settings, record)
        proc: subprocess.Popen[bytes] | None = None
        try:
            cmd = _worker_command(base_cmd, record, req, listener.url, settings.name)
            status(f"starting {worker_id} on port {port}")
            proc = _launch(cmd, _worker_env(token, req.orchestrator_token), log_path)
            record = record.model_copy(update={"pid": proc.pid, "create_time": _create_time(proc.pid)})
            write_record(settings, record)
            _wait_ready(proc, listener, record, req.timeout, status)
        except BaseException as exc:
            if proc is not None:
                kill_group(proc.pid, grace=3.0)
                proc.wait()
            remove_record(settings, worker_id)
            if isinstance(exc, SpawnFailed):
                raise SpawnFailed(exc.message, detail=_log_tail(log_path)) from None
            raise
    ready = record.model_copy(update={"state": "ready", "ready_at": now_iso()})
    write_record(settings, ready)
    return ready


def _worker_command(
    base: list[str], record: WorkerRecord, req: SpawnRequest, listener_url: str, pool: str
) -> list[str]:
    """The ``rbees-workerd`` command line (docs/CONTRACTS.md); the token goes in the environment."""
    cmd = [
        *base,
        "--worker-id", record.worker_id,
        "--model", str(record.model_path),
        "--port", str(record.port),
        "--backend", record.backend.value,
        "--host", record.host,
        "--model-id", record.model_id,
        "--callback-url", listener_url,
        "--advertise-url", record.uri,
        "--pool", pool,
    ]  # fmt: skip
    if req.orchestrator:
        cmd += ["--callback-url", req.orchestrator.rstrip("/") + "/v2/workers/register"]
    for flag, value in (
        ("--gpu", record.gpu),
        ("--slots", req.slots),
        ("--threads", req.threads),
        ("--prefill-batch-tokens", req.prefill_batch_tokens),
        ("--refill-wait", req.refill_wait),
        ("--prefill-gather", req.prefill_gather),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def _worker_env(token: str, callback_token: str | None) -> dict[str, str]:
    env = {**os.environ, "RBEES_WORKER_TOKEN": token}
    env.pop("RBEES_CALLBACK_TOKEN", None)
    if callback_token:
        env["RBEES_CALLBACK_TOKEN"] = callback_token
    return env


def _launch(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start detached: its own session (so its group can be signalled), output to its log."""
    with log_path.open("ab") as log:
        try:
            return subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise SpawnFailed(f"cannot start {cmd[0]}: {exc.strerror or exc}") from None


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _wait_ready(
    proc: subprocess.Popen[bytes],
    listener: ReadyListener,
    record: WorkerRecord,
    timeout: float,
    status: Status,
) -> WorkerRegistration | None:
    """Until the ready callback arrives (or ``/health`` says healthy), the process exits, or time runs out."""
    started = time.monotonic()
    next_health = started + 1.0
    while True:
        reg = listener.wait(0.2)
        if reg is not None:
            return reg
        code = proc.poll()
        if code is not None:
            raise SpawnFailed(f"worker {record.worker_id} exited with code {code} before it was ready")
        now = time.monotonic()
        if now - started > timeout:
            raise SpawnFailed(f"worker {record.worker_id} was not ready after {timeout:.0f}s")
        if now >= next_health:
            next_health = now + 1.0
            health = get_health(record.local_url, record.token, timeout=1.0)
            state = str(health.get("status")) if health else "starting"
            if state == "healthy":
                return None
            status(f"waiting for {record.worker_id} on port {record.port} ({state}, {now - started:.0f}s)")


def orchestrator_knows(record: WorkerRecord, timeout: float = 10.0) -> bool | None:
    """Does the orchestrator list the worker? None when it cannot be asked (no orchestrator, no access)."""
    if record.orchestrator is None:
        return None
    url = f"{record.orchestrator.rstrip('/')}/v2/workers"
    headers = {"Authorization": f"Bearer {record.orchestrator_token}"} if record.orchestrator_token else {}
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3.0) as resp:
                body = json.loads(resp.read(1 << 22))
        except urllib.error.HTTPError:
            return None
        except (OSError, ValueError):
            body = {}
        workers = body.get("workers", []) if isinstance(body, dict) else []
        if any(isinstance(w, dict) and w.get("worker_id") == record.worker_id for w in workers):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def callback_refused(record: WorkerRecord, timeout: float = 10.0) -> str | None:
    """The worker log's line saying the orchestrator refused its ready callback (a wrong or missing
    token, a registration it did not take), once the log says how the callback went; None when it
    was accepted, or the log says nothing within ``timeout``."""
    if record.orchestrator is None or record.log_path is None:
        return None
    prefix = f"ready callback to {record.orchestrator.rstrip('/')}/v2/workers/register "
    deadline = time.monotonic() + timeout
    while True:
        try:
            lines = Path(record.log_path).read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in reversed(lines):
            if prefix + "accepted" in line:
                return None
            if prefix + "refused" in line:
                return line[line.index(prefix) :].strip()
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return f"(no log at {path})"
    body = "\n".join(f"  | {line}" for line in lines) if lines else "  | (empty)"
    return f"last lines of {path}:\n{body}"
