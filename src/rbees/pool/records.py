"""Runtime records of spawned workers: ``workers/<worker_id>.json`` in the pool home, mode 0600.

A record is written (``state: starting``) before the process starts, which claims its port against
concurrent spawns, and becomes ``ready`` once the worker called back. It holds the worker's token,
so the file is private and the token never leaves through ``public()``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rbees.pool.errors import NotFound
from rbees.pool.fsutil import atomic_write_json
from rbees.pool.settings import PoolSettings
from rbees.protocol import Backend

_WORKER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
PUBLIC_FIELDS = ("worker_id", "pid", "backend", "model_id", "port", "gpu", "started_at", "uri")


class WorkerRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    worker_id: str
    pid: int = 0
    backend: Backend
    model_id: str
    port: int
    gpu: int | None = None
    started_at: str
    uri: str
    local_url: str
    host: str = "127.0.0.1"
    token: str = Field(repr=False)
    state: Literal["starting", "ready"] = "starting"
    ready_at: str | None = None  # when its ready callback reached the spawning CLI
    create_time: float | None = None
    spawner_pid: int | None = None
    slots: int | None = None
    log_path: str | None = None
    model_path: str | None = None
    orchestrator: str | None = None
    orchestrator_token: str | None = Field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """The record as shown to anyone: no secrets."""
        data = self.model_dump(
            mode="json", exclude={"token", "orchestrator_token", "create_time", "spawner_pid"}
        )
        return {k: data[k] for k in PUBLIC_FIELDS} | {k: v for k, v in data.items() if k not in PUBLIC_FIELDS}


def check_worker_id(worker_id: str) -> str:
    if not _WORKER_ID_RE.fullmatch(worker_id) or ".." in worker_id:
        raise NotFound(f"unknown worker {worker_id!r} (see `rbees-pool worker list`)")
    return worker_id


def write_record(settings: PoolSettings, record: WorkerRecord) -> None:
    settings.ensure_dirs()
    path = settings.workers_dir / f"{check_worker_id(record.worker_id)}.json"
    atomic_write_json(path, record.model_dump(mode="json"), mode=0o600)


def remove_record(settings: PoolSettings, worker_id: str) -> None:
    (settings.workers_dir / f"{check_worker_id(worker_id)}.json").unlink(missing_ok=True)


def get_record(settings: PoolSettings, worker_id: str) -> WorkerRecord:
    path = settings.workers_dir / f"{check_worker_id(worker_id)}.json"
    try:
        return WorkerRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise NotFound(f"unknown worker {worker_id!r} (see `rbees-pool worker list`)") from None
    except (OSError, ValidationError) as exc:
        raise NotFound(
            f"worker record {path} is unreadable ({type(exc).__name__}); "
            "`rbees-pool worker prune` sets it aside"
        ) from None


def read_records(settings: PoolSettings) -> list[WorkerRecord]:
    """Every readable record, oldest first; unreadable files are skipped (see ``unreadable_records``)."""
    return _scan(settings)[0]


def unreadable_records(settings: PoolSettings) -> list[Path]:
    """Record files whose content is no worker record (damaged by hand or by a full disk); one that
    cannot be opened at all (permissions) is not among them: it may well describe a live worker."""
    return _scan(settings)[1]


def set_aside(path: Path) -> Path:
    """Rename an unreadable record out of the way (kept for a look, no longer a record)."""
    target = path.with_name(path.name + ".unreadable")
    path.replace(target)
    return target


def _scan(settings: PoolSettings) -> tuple[list[WorkerRecord], list[Path]]:
    records: list[WorkerRecord] = []
    unreadable: list[Path] = []
    if not settings.workers_dir.is_dir():
        return records, unreadable
    for path in sorted(settings.workers_dir.glob("*.json")):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        try:
            records.append(WorkerRecord.model_validate(json.loads(raw)))
        except (ValueError, ValidationError):
            unreadable.append(path)
    return sorted(records, key=lambda r: (r.started_at, r.worker_id)), unreadable


def _pid_alive(pid: int, create_time: float | None) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def process_alive(record: WorkerRecord) -> bool:
    """Is the record's process (the very one, not a reused pid) still running?

    A record still ``starting`` without a pid is alive as long as the CLI that spawns it is.
    """
    if record.pid > 0:
        return _pid_alive(record.pid, record.create_time)
    return record.spawner_pid is not None and _pid_alive(record.spawner_pid, None)
