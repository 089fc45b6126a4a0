"""Pool settings, merged once: ``pool.toml`` in the pool home, then environment, then flags.

The pool home is ``$RBEES_HOME`` (default ``~/.rbees``). Its optional ``pool.toml``::

    name = "workstation"                    # pool name put in the ready callback (default: hostname)
    orchestrator = "http://orch.lan:8080"   # default --orchestrator for `worker spawn`
    orchestrator_token = "..."              # default --orchestrator-token
    advertise_host = "workstation.lan"      # default --advertise-host
    first_port = 8001                       # workers get ports from here upward
    workerd = ["/opt/rbees/bin/rbees-workerd"]

Environment: ``RBEES_HOME``, ``RBEES_POOL_NAME``, ``RBEES_ORCHESTRATOR``, ``RBEES_ORCHESTRATOR_TOKEN``,
``RBEES_ADVERTISE_HOST``, ``RBEES_WORKERD`` (a command line, split like a shell would), and
``HF_ENDPOINT`` (another hub, e.g. a mirror). ``HF_TOKEN`` is left to huggingface_hub.
"""

from __future__ import annotations

import os
import shlex
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rbees.pool.errors import InvalidInput
from rbees.protocol import BearerToken, PoolName

DEFAULT_FIRST_PORT = 8001


class PoolSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    home: Path
    name: PoolName = Field(default_factory=socket.gethostname)
    orchestrator: str | None = None
    orchestrator_token: BearerToken | None = Field(default=None, repr=False)
    advertise_host: str | None = None
    first_port: int = Field(default=DEFAULT_FIRST_PORT, ge=1024, le=65535)
    workerd: list[str] | None = None
    hf_endpoint: str | None = None

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.json"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def workers_dir(self) -> Path:
        return self.home / "workers"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"

    def ensure_dirs(self) -> None:
        """Create the home layout; the home and the worker records (which hold tokens) are private."""
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            for d in (self.models_dir, self.logs_dir, self.locks_dir):
                d.mkdir(exist_ok=True)
            self.workers_dir.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.workers_dir, 0o700)
        except OSError as exc:
            where = exc.filename or self.home
            raise InvalidInput(
                f"cannot set up the pool home {self.home}: {where}: {exc.strerror or exc}"
            ) from None


_ENV_KEYS = {
    "RBEES_POOL_NAME": "name",
    "RBEES_ORCHESTRATOR": "orchestrator",
    "RBEES_ORCHESTRATOR_TOKEN": "orchestrator_token",
    "RBEES_ADVERTISE_HOST": "advertise_host",
    "HF_ENDPOINT": "hf_endpoint",
}


def load_settings(env: Mapping[str, str] | None = None) -> PoolSettings:
    """Read ``pool.toml`` in the home, let the environment override it."""
    env = os.environ if env is None else env
    raw_home = env.get("RBEES_HOME") or str(Path.home() / ".rbees")
    try:
        home = Path(raw_home).expanduser().absolute()
    except RuntimeError as exc:  # ~someone who does not exist
        raise InvalidInput(f"bad pool home {raw_home!r}: {exc}") from None
    values: dict[str, Any] = _read_pool_toml(home / "pool.toml")
    for var, key in _ENV_KEYS.items():
        if env.get(var):
            values[key] = env[var]
    if env.get("RBEES_WORKERD"):
        try:
            values["workerd"] = shlex.split(env["RBEES_WORKERD"])
        except ValueError as exc:
            raise InvalidInput(f"bad RBEES_WORKERD {env['RBEES_WORKERD']!r}: {exc}") from None
    try:
        return PoolSettings(home=home, **values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"bad pool setting {where!r}: {first['msg']}") from None


def _read_pool_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None
