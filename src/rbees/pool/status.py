"""``rbees-pool status``: what this machine offers (backends, GPUs, CPU, RAM) and what runs on it."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

import psutil

from rbees.pool.catalog import Catalog
from rbees.pool.settings import PoolSettings
from rbees.pool.workers import WorkerView, list_workers


def nvidia_gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs through NVML (nvidia-ml-py); empty without a driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    gpus: list[dict[str, Any]] = []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                {
                    "index": index,
                    "name": _text(pynvml.nvmlDeviceGetName(handle)),
                    "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
                    "memory_total_bytes": int(mem.total),
                    "memory_free_bytes": int(mem.free),
                    "memory_used_bytes": int(mem.used),
                    "driver": driver,
                }
            )
    except pynvml.NVMLError:
        pass
    finally:
        pynvml.nvmlShutdown()
    return gpus


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def apple_mps() -> bool:
    """Apple Metal through torch's MPS backend (torch is only imported on Apple silicon)."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return False
    import torch

    return bool(torch.backends.mps.is_available())


def pool_status(settings: PoolSettings) -> tuple[dict[str, Any], list[WorkerView]]:
    """The status document (as ``--json`` prints it) and the worker views it was made from."""
    gpus = nvidia_gpus()
    mps = apple_mps()
    mem = psutil.virtual_memory()
    workers = list_workers(settings)
    models = Catalog(settings).entries()
    return {
        "hostname": socket.gethostname(),
        "pool": settings.name,
        "home": str(settings.home),
        "platform": f"{platform.system()} {platform.machine()}",
        "backends": {"cpu": True, "cuda": bool(gpus), "metal": mps},
        "gpus": gpus,
        "mps": mps,
        "cpu": {
            "cores_logical": psutil.cpu_count(logical=True) or os.cpu_count() or 1,
            "cores_physical": psutil.cpu_count(logical=False),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
        "memory": {"total_bytes": int(mem.total), "available_bytes": int(mem.available)},
        "workers": [w.public() for w in workers],
        "models": [m.model_dump(mode="json", exclude_none=True) for m in models],
    }, workers
