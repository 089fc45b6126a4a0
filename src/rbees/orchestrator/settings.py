"""The one settings model of ``rbees-orcd``.

``main`` merges a TOML file, ``RBEES_ORCD_*`` environment variables and command-line flags (in that order,
later wins) into one :class:`OrchestratorSettings`, which is then passed explicitly to ``create_app``.
Nothing reads the environment anywhere else.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rbees.protocol import BearerToken

ENV_PREFIX = "RBEES_ORCD_"


class Policy(StrEnum):
    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"
    MOST_FREE_MEMORY = "most-free-memory"


class OrchestratorSettings(BaseModel):
    """Everything ``rbees-orcd`` can be told. Times are in seconds; 0 disables a timeout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        default="127.0.0.1", description="address to bind; anything but loopback needs an API token"
    )
    port: int = Field(default=8080, ge=1, le=65535, description="port to listen on")
    state_dir: Path = Field(
        default_factory=lambda: Path.home() / ".rbees" / "orcd",
        description="directory of the SQLite registry",
    )
    api_token: BearerToken | None = Field(
        default=None, description="bearer token clients must send (all routes but /health)"
    )
    registration_token: BearerToken | None = Field(
        default=None, description="bearer token workers must send to register (else the API token)"
    )
    public_url: str | None = Field(
        default=None, description="base URL put in events_url (unset: a relative path)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="debug | info | warning | error"
    )

    queue_size: int = Field(
        default=1024, ge=1, le=1_000_000, description="jobs that may wait; more is 429 QUEUE_FULL"
    )
    policy: Policy = Field(
        default=Policy.LEAST_LOADED, description="least-loaded | round-robin | most-free-memory"
    )
    policy_script: Path | None = Field(
        default=None,
        description="Starlark file defining choose(job, workers); the policy above is its fallback",
    )
    policy_script_timeout_ms: int = Field(
        default=20, ge=1, le=10_000, description="time bound of one policy script call"
    )

    queue_timeout_s: float = Field(default=300.0, ge=0, description="longest wait in the queue (0: none)")
    no_worker_timeout_s: float = Field(
        default=60.0,
        ge=0,
        description=(
            "a job for a model whose every worker has been unreachable this long is refused with 503 "
            "NO_WORKER_AVAILABLE, or ended so if queued (0: jobs wait for the queue timeout)"
        ),
    )
    first_token_timeout_s: float = Field(
        default=120.0, ge=0, description="longest wait from dispatch to the first token (0: none)"
    )
    silence_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="longest silence of a worker between events once tokens flow (0: none)",
    )
    total_timeout_s: float = Field(
        default=1800.0,
        ge=0,
        description="longest job from acceptance to its end; deadline_ms can only shorten it (0: none)",
    )
    cancel_grace_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="how long a worker gets to confirm a cancel before the job is ended anyway",
    )

    max_retries: int = Field(
        default=2, ge=0, le=20, description="dispatch retries on another worker before the first token"
    )
    retry_backoff_s: float = Field(
        default=0.05, ge=0, le=60, description="first retry delay; doubles each retry"
    )
    retry_backoff_max_s: float = Field(default=2.0, ge=0, le=600, description="longest retry delay")
    worker_channels: bool = Field(
        default=True,
        description="take each worker's jobs' events over one connection (its event channel) where the "
        "worker offers one; false: one stream per job",
    )

    health_interval_s: float = Field(
        default=1.0, gt=0, le=600, description="seconds between health polls of each worker"
    )
    health_timeout_s: float = Field(
        default=1.0, gt=0, le=600, description="a health poll slower than this counts as failed"
    )
    health_fail_threshold: int = Field(
        default=2, ge=1, le=100, description="failed polls in a row that take a worker out of scheduling"
    )
    health_recover_threshold: int = Field(
        default=2,
        ge=1,
        le=100,
        description="good polls in a row that bring it back (doubled per recent flap)",
    )
    health_flap_window_s: float = Field(
        default=60.0, ge=0, description="how long a worker's past drop-outs count against it"
    )

    job_retention: int = Field(
        default=1000, ge=0, le=10_000_000, description="finished jobs kept in memory for event replay"
    )
    job_retention_s: float = Field(
        default=3600.0, ge=0, description="how long a finished job's events are kept in memory"
    )

    @field_validator("api_token", "registration_token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value  # RBEES_ORCD_API_TOKEN= (empty) means no token

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _wide_bind_needs_token(self) -> OrchestratorSettings:
        if not is_loopback(self.host) and not self.api_token:
            raise ValueError(
                f"refusing to bind {self.host!r} without an API token: set api_token "
                "(--api-token, RBEES_ORCD_API_TOKEN or the config file) or bind 127.0.0.1"
            )
        return self

    @property
    def db_path(self) -> Path:
        return self.state_dir / "orcd.sqlite3"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_toml(path: Path) -> dict[str, Any]:
    """Read a config file. Keys sit at the top level or under ``[orchestrator]``, not both."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    section = data.get("orchestrator", data)
    if not isinstance(section, dict):
        raise ValueError(f"{path}: [orchestrator] must be a table")
    if section is not data and len(data) > 1:
        others = ", ".join(sorted(k for k in data if k != "orchestrator"))
        raise ValueError(
            f"{path}: keys outside [orchestrator] would be ignored ({others}); move them into it"
        )
    return {k.replace("-", "_"): v for k, v in section.items()}


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Pick ``RBEES_ORCD_<FIELD>`` variables; pydantic converts the strings."""
    fields = OrchestratorSettings.model_fields
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in fields:
                out[name] = value
    return out


def merge_settings(
    file_values: Mapping[str, Any], env_values: Mapping[str, Any], flag_values: Mapping[str, Any]
) -> OrchestratorSettings:
    """File, then environment, then flags; ``None`` flags mean "not given"."""
    merged: dict[str, Any] = dict(file_values)
    merged.update(env_values)
    merged.update({k: v for k, v in flag_values.items() if v is not None})
    return OrchestratorSettings.model_validate(merged)
