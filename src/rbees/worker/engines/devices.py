"""Mapping a backend (cpu, cuda, metal) and a GPU index onto a torch device, or saying why not."""

from __future__ import annotations

import torch

from rbees.protocol import Backend


class DeviceError(Exception):
    """The requested backend or GPU is not present on this machine."""


def resolve_device(backend: Backend, gpu: int | None) -> str:
    if backend is Backend.CPU:
        return "cpu"
    if backend is Backend.CUDA:
        if not torch.cuda.is_available():
            build = (
                "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            )
            raise DeviceError(f"backend cuda is not available: {build}")
        index = gpu or 0
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"--gpu {index} does not exist: {count} CUDA device(s) visible")
        return f"cuda:{index}"
    if not torch.backends.mps.is_available():
        raise DeviceError(
            "backend metal is not available: no Apple MPS device (needs macOS on Apple silicon)"
        )
    if gpu not in (None, 0):
        raise DeviceError(f"--gpu {gpu} does not exist: metal has a single device, 0")
    return "mps"


def dtype_for(device: str) -> torch.dtype | None:
    """The weight dtype per device: fp32 on cpu, fp16 on mps, the checkpoint's own on cuda (None)."""
    if device == "cpu":
        return torch.float32
    if device == "mps":
        return torch.float16
    return None


def device_memory_bytes(device: str) -> int | None:
    """Memory allocated by torch on a GPU device; None on cpu."""
    if device.startswith("cuda"):
        return int(torch.cuda.memory_allocated(torch.device(device)))
    if device == "mps":
        return int(torch.mps.current_allocated_memory())
    return None
