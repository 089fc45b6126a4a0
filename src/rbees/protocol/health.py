"""Health reports and the worker's ready callback (which is also the registration body)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from rbees.protocol.requests import Backend


def is_http_url(url: str) -> bool:
    """An ``http(s)://`` URL with a host, and a port in 1-65535 if it names one."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port != 0  # .port raises ValueError for a port that is no number or past 65535
    except ValueError:
        return False
    return port_ok and parts.scheme in ("http", "https") and bool(parts.hostname)


def _header_safe(token: str) -> str:
    if not all("!" <= c <= "~" for c in token):
        raise ValueError("a token must be printable ASCII without spaces (it is sent in an HTTP header)")
    return token


BearerToken = Annotated[str, StringConstraints(min_length=1, max_length=1024), AfterValidator(_header_safe)]
PoolName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class WorkerStatus(StrEnum):
    LOADING = "loading"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


class WorkerHealth(BaseModel):
    """``GET /health`` on a worker."""

    model_config = ConfigDict(frozen=True)

    status: WorkerStatus
    worker_id: str
    model: str
    backend: Backend
    device: str
    vram_bytes: int = 0
    slots_total: int
    slots_busy: int
    uptime_s: float
    context_length: int | None = None
    error: str | None = None


class WorkerRegistration(BaseModel):
    """The ready callback a worker POSTs once loaded; the orchestrator registers exactly this.

    ``token`` is the worker's own bearer token, so whoever receives it can call the worker.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    worker_id: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")]
    uri: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=512)]
    model_ref: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    backend: Backend
    device: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    gpu: int | None = Field(default=None, ge=0, le=1024)
    vram_bytes: int = Field(default=0, ge=0)
    slots_total: int = Field(ge=1, le=1024)
    pool: PoolName | None = None
    token: BearerToken | None = None  # the worker's own, sent in a header to call it

    @field_validator("uri")
    @classmethod
    def _reachable_uri(cls, uri: str) -> str:
        """A URI the orchestrator can call: a host, and a port (when given) in 1-65535."""
        parts = urlsplit(uri)  # raises ValueError for e.g. an unclosed IPv6 bracket
        if not parts.hostname:
            raise ValueError("the uri has no host")
        if parts.port == 0:  # .port raises ValueError past 65535 or for a port that is no number
            raise ValueError("the uri's port must be 1-65535")
        return uri


class OrchestratorHealth(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: str
    pools: int
    workers: int
    queue_depth: int
