"""Stopping workers: SIGTERM to the process group, a grace period, SIGKILL, record removed, port checked."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psutil

from rbees.pool.errors import Conflict
from rbees.pool.ports import wait_port_released
from rbees.pool.records import WorkerRecord, get_record, process_alive, read_records, remove_record
from rbees.pool.settings import PoolSettings

DEFAULT_GRACE_S = 30.0


@dataclass(frozen=True)
class StopResult:
    worker_id: str
    port: int
    was_running: bool
    killed: bool
    port_released: bool
    deregistered: bool | None


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the group ``pid`` leads (workers have their own session), or just ``pid`` if it leads none."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    except PermissionError:
        pass


def kill_group(pid: int, grace: float) -> bool:
    """SIGTERM the group led by ``pid``, SIGKILL it after ``grace`` seconds; True if it had to be killed."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = not _gone(pid)
    # Sweep the group either way: children may outlive the leader.
    _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def stop_record(settings: PoolSettings, record: WorkerRecord, grace: float = DEFAULT_GRACE_S) -> StopResult:
    running = process_alive(record)
    if running and record.pid <= 0:
        raise Conflict(
            f"worker {record.worker_id} is still being spawned (by pid {record.spawner_pid}); retry"
        )
    killed = kill_group(record.pid, grace) if running else False
    deregistered = _deregister(record.orchestrator, record) if record.orchestrator else None
    remove_record(settings, record.worker_id)
    released = wait_port_released(record.port, record.host, timeout=5.0)
    return StopResult(record.worker_id, record.port, running, killed, released, deregistered)


def stop_worker(settings: PoolSettings, worker_id: str, grace: float = DEFAULT_GRACE_S) -> StopResult:
    return stop_record(settings, get_record(settings, worker_id), grace)


def stop_all(settings: PoolSettings, grace: float = DEFAULT_GRACE_S) -> list[StopResult | Conflict]:
    records = read_records(settings)
    if not records:
        return []

    def one(record: WorkerRecord) -> StopResult | Conflict:
        try:
            return stop_record(settings, record, grace)
        except Conflict as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(16, len(records))) as pool:
        return list(pool.map(one, records))


def _deregister(orchestrator: str, record: WorkerRecord) -> bool:
    """Tell the orchestrator the worker is gone (best effort: it also notices by itself)."""
    url = f"{orchestrator.rstrip('/')}/v2/workers/{record.worker_id}"
    headers = {"Authorization": f"Bearer {record.orchestrator_token}"} if record.orchestrator_token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method="DELETE", headers=headers), timeout=3.0
        ):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code == 404
    except (OSError, ValueError):
        return False
