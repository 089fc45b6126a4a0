"""Pool tests run the real ``rbees-pool`` program in a temporary pool home, and leave nothing running."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

_SCRUBBED = (
    "RBEES_ORCHESTRATOR",
    "RBEES_ORCHESTRATOR_TOKEN",
    "RBEES_POOL_NAME",
    "RBEES_ADVERTISE_HOST",
    "RBEES_WORKERD",
    "RBEES_WORKER_TOKEN",
    "RBEES_CALLBACK_TOKEN",
    "HF_TOKEN",
    "HF_ENDPOINT",
)


@pytest.fixture(autouse=True)
def pool_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "rbees-home"
    monkeypatch.setenv("RBEES_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in _SCRUBBED:
        monkeypatch.delenv(var, raising=False)
    yield home
    _kill_leftovers(home)


def _kill_leftovers(home: Path) -> None:
    """Safety net: whatever a failed test left running in this home is killed with its group."""
    for record in (home / "workers").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(json.loads(record.read_text()).get("pid") or 0)
            if pid > 0:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
