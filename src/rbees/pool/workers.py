"""What the pool knows about its workers: records joined with process state and ``/health``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rbees.pool.records import WorkerRecord, process_alive, read_records, remove_record
from rbees.pool.settings import PoolSettings

HEALTH_TIMEOUT_S = 2.0

_STATUS = {"healthy": "Running", "loading": "Loading", "unhealthy": "Unhealthy", "draining": "Draining"}


@dataclass(frozen=True)
class WorkerView:
    record: WorkerRecord
    status: str
    health: dict[str, Any] | None

    def public(self) -> dict[str, Any]:
        return self.record.public() | {"status": self.status, "health": self.health}


def get_health(url: str, token: str | None, timeout: float = HEALTH_TIMEOUT_S) -> dict[str, Any] | None:
    """The worker's ``/health`` body, or None if it does not answer with JSON."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{url}/health", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.loads(resp.read(1 << 20))
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read(1 << 20))
        except ValueError:
            return None
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def view(record: WorkerRecord) -> WorkerView:
    if not process_alive(record):
        return WorkerView(record, "Dead", None)
    health = get_health(record.local_url, record.token) if record.pid > 0 else None
    if health is None:
        return WorkerView(record, "Starting" if record.state == "starting" else "Unhealthy", None)
    return WorkerView(record, _STATUS.get(str(health.get("status")), "Unhealthy"), health)


def list_workers(settings: PoolSettings) -> list[WorkerView]:
    records = read_records(settings)
    if not records:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(records))) as pool:
        return list(pool.map(view, records))


def prune_workers(settings: PoolSettings) -> list[WorkerRecord]:
    """Remove the records of workers whose process is gone."""
    dead = [r for r in read_records(settings) if not process_alive(r)]
    for record in dead:
        remove_record(settings, record.worker_id)
    return dead
