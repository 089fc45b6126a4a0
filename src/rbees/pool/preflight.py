"""Checks made before a worker is started; each failure is one clear message and nothing runs.

- the model is in the catalog, downloaded, and its files are there;
- the backend exists here: CUDA device N (torch sees it), Apple MPS;
- there is free memory (RAM, or the GPU's VRAM) for the model's files with headroom;
- the orchestrator to register with, if any, answers.

The memory need is an estimate from the files' size: weights loaded as stored (x1.2), GGUF
weights possibly dequantized (x2), plus 256 MiB for the runtime. ``check_memory=False`` skips it.
"""

from __future__ import annotations

import ipaddress
import platform
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from pydantic import TypeAdapter, ValidationError

from rbees.pool.catalog import Catalog, CatalogEntry
from rbees.pool.errors import InvalidInput, PreflightFailed
from rbees.pool.fsutil import tree_size
from rbees.pool.ports import can_bind
from rbees.pool.settings import PoolSettings
from rbees.protocol import Backend, BearerToken, is_http_url

if TYPE_CHECKING:
    from rbees.pool.spawn import SpawnRequest

HEADROOM_BYTES = 256 << 20
_FACTOR = {"hf": 1.2, "gguf": 2.0}


def preflight(settings: PoolSettings, req: SpawnRequest) -> tuple[CatalogEntry, Path]:
    catalog = Catalog(settings)
    entry = catalog.get(req.model_id)
    path = catalog.model_path(entry)
    if not entry.downloaded:
        raise PreflightFailed(
            f"model {entry.id!r} is not downloaded; run `rbees-pool models download {entry.id}` first"
        )
    if not path.exists():
        raise PreflightFailed(
            f"model {entry.id!r} is marked downloaded but {path} is missing; download it again"
        )
    if req.backend is Backend.CPU and req.gpu is not None:
        raise InvalidInput("--gpu is only for cuda and metal workers")
    check_hosts(req.host, req.advertise_host)
    free, where = available_memory(req.backend, req.gpu or 0)
    if req.check_memory:
        need = estimate_need(entry, path)
        if need > free:
            raise PreflightFailed(
                f"not enough free {where} for {entry.id}: it needs about {need / 2**30:.1f} GiB, "
                f"{free / 2**30:.1f} GiB are free (--skip-memory-check to try anyway)"
            )
    if req.orchestrator is not None:
        check_orchestrator(req.orchestrator)
    if req.orchestrator_token is not None:
        try:
            _TOKEN.validate_python(req.orchestrator_token)
        except ValidationError as exc:
            raise InvalidInput(f"invalid --orchestrator-token: {exc.errors()[0]['msg']}") from None
    return entry, path


def estimate_need(entry: CatalogEntry, path: Path) -> int:
    size = tree_size(path)
    return int(size * _FACTOR.get(entry.format, 1.2)) + HEADROOM_BYTES


def available_memory(backend: Backend, gpu: int) -> tuple[int, str]:
    """Free bytes where the model would live, after checking that the backend exists."""
    if backend is Backend.CUDA:
        return _cuda_free(gpu), f"VRAM on cuda:{gpu}"
    if backend is Backend.METAL:
        _check_metal(gpu)
        return int(psutil.virtual_memory().available), "unified memory"
    return int(psutil.virtual_memory().available), "RAM"


def _cuda_free(gpu: int) -> int:
    import torch  # slow to import: only when a CUDA worker is asked for

    if not torch.cuda.is_available():
        raise PreflightFailed(
            f"CUDA is not available here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'})"
        )
    count = torch.cuda.device_count()
    if not 0 <= gpu < count:
        raise PreflightFailed(f"CUDA device {gpu} does not exist: this machine has {count} (0..{count - 1})")
    free, _total = torch.cuda.mem_get_info(gpu)
    return int(free)


def _check_metal(gpu: int) -> None:
    if platform.system() != "Darwin":
        raise PreflightFailed("Metal (MPS) needs macOS on Apple silicon")
    import torch

    if not torch.backends.mps.is_available():
        raise PreflightFailed("Metal (MPS) is not available to torch on this Mac")
    if gpu != 0:
        raise PreflightFailed(f"Metal has one device: use --gpu 0, not {gpu}")


_TOKEN: TypeAdapter[str] = TypeAdapter(BearerToken)
# Host names as they occur: DNS labels, plus underscores (container and service names) and a final dot.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,254}}$){_LABEL}(?:\.{_LABEL})*\.?$")


def check_hosts(bind: str | None, advertise: str | None) -> None:
    """``--host`` must be an address of this machine, ``--advertise-host`` a host name or address."""
    if bind is not None and bind not in ("0.0.0.0", "::") and not _local_address(bind):
        raise InvalidInput(f"invalid --host {bind!r}: not an address of this machine")
    if advertise is not None:
        try:
            ipaddress.ip_address(advertise)
        except ValueError:
            if not _HOSTNAME.match(advertise):
                raise InvalidInput(
                    f"invalid --advertise-host {advertise!r}: expected a host name or address"
                ) from None


def _local_address(host: str) -> bool:
    """Whether a server could listen on ``host`` (a name is tried at each address it resolves to)."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return False
    return any(can_bind(0, str(info[4][0])) for info in infos)


def check_orchestrator(url: str) -> None:
    if not is_http_url(url):
        raise InvalidInput(f"invalid --orchestrator {url!r}: expected http(s)://host:port")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5.0):
            pass
    except urllib.error.HTTPError:
        return  # it answered; auth or routing is its own business
    except (OSError, ValueError) as exc:
        raise PreflightFailed(f"orchestrator {url} does not answer: {exc}") from None
