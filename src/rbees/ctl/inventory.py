"""The pools inventory (``~/.config/rbees/pools.toml``) and how ``--host`` values become SSH targets.

The file holds an optional ``[defaults]`` table, applied to every pool and to plain SSH destinations,
and one ``[pools.NAME]`` table per pool::

    [defaults]
    identity_file = "~/.ssh/id_ed25519"

    [pools.mac]
    host = "mac.home.arpa"          # hostname, IP or ~/.ssh/config alias
    user = "vince"
    install_dir = "~/rbees"         # git checkout; its .venv holds rbees-pool
    env = { RBEES_HOME = "~/.rbees" }

A ``--host`` value is a pool name when the inventory has one by that name, otherwise an SSH
destination: ``host``, ``user@host``, ``user@host:port``, ``[v6addr]:port`` or ``ssh://user@host:port``.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tomli_w
from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

DEFAULT_INSTALL_DIR = "~/rbees"
DEFAULT_PYTHON = "python3"
DEFAULT_CONNECT_TIMEOUT_S = 10

_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_RE = re.compile(r"^[^\s@/\\'\"`$;&|<>()]+$")
_USER_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*\$?$")

PoolName = Annotated[str, StringConstraints(pattern=_NAME_RE)]


class InventoryError(Exception):
    """The inventory file cannot be read or written, or a ``--host`` value names nothing usable."""


class PoolSettings(BaseModel):
    """Settings a pool may set, and ``[defaults]`` may set for all of them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    user: str | None = None
    identity_file: str | None = None
    known_hosts_file: str | None = None
    ssh_config: str | None = None
    connect_timeout: Annotated[int, Field(ge=1, le=600)] | None = None
    install_dir: str | None = None
    rbees_pool: str | None = None
    python: str | None = None
    repo: str | None = None
    torch: str | None = None
    env: dict[str, str] = Field(default_factory=dict)


class PoolEntry(PoolSettings):
    """One ``[pools.NAME]`` table: where the pool is and how to run rbees-pool there."""

    host: str


class Inventory(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    defaults: PoolSettings = Field(default_factory=PoolSettings)
    pools: dict[PoolName, PoolEntry] = Field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """A resolved remote host: everything needed to build the ``ssh`` command and the remote script."""

    label: str
    host: str
    port: int | None = None
    user: str | None = None
    identity_file: str | None = None
    known_hosts_file: str | None = None
    ssh_config: str | None = None
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_S
    install_dir: str = DEFAULT_INSTALL_DIR
    rbees_pool: str = "rbees-pool"
    # Neither rbees_pool nor install_dir was configured: rbees_pool is the default install dir's, used
    # when it is there (what `rbees pool dev setup` installs), else `rbees-pool` on the PATH.
    path_fallback: bool = False
    python: str = DEFAULT_PYTHON
    repo: str | None = None
    torch: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def venv(self) -> str:
        return f"{self.install_dir.rstrip('/')}/.venv"

    @property
    def rbees_pool_label(self) -> str:
        """The rbees-pool command as a person reads it."""
        return f"{self.rbees_pool}, else rbees-pool on the PATH" if self.path_fallback else self.rbees_pool

    @property
    def where(self) -> str:
        """``user@host:port`` as far as known, for messages."""
        who = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        host = f"[{self.host}]" if ":" in self.host and port else self.host  # an IPv6 address
        return f"{who}{host}{port}"


def expand_home(value: str | Path) -> Path:
    """``value`` with a leading ``~`` or ``~user`` expanded; an unknown user is an ``InventoryError``."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        raise InventoryError(f"cannot expand {str(value)!r}: no such user's home") from None


def default_inventory_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("RBEES_POOLS_FILE"):
        return expand_home(env["RBEES_POOLS_FILE"])
    config_home = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return expand_home(config_home) / "rbees" / "pools.toml"


def load_inventory(path: Path) -> Inventory:
    """Read the inventory; a missing file is an empty inventory."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Inventory()
    except OSError as exc:
        raise InventoryError(f"cannot read inventory {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InventoryError(f"inventory {path} is not valid TOML: {exc}") from exc
    try:
        inventory = Inventory.model_validate(data)
    except ValidationError as exc:
        raise InventoryError(f"inventory {path} is invalid: {_first_error(exc)}") from exc
    for name, entry in inventory.pools.items():
        check_settings(entry, f"pool {name!r} in {path}")
        check_destination_host(entry.host, f"pool {name!r} in {path}")
    check_settings(inventory.defaults, f"[defaults] in {path}")
    return inventory


def save_inventory(inventory: Inventory, path: Path) -> None:
    """Write the whole inventory atomically (comments in a hand-edited file are not kept)."""
    data: dict[str, Any] = {}
    defaults = inventory.defaults.model_dump(exclude_defaults=True)
    if defaults:
        data["defaults"] = defaults
    data["pools"] = {name: entry.model_dump(exclude_defaults=True) for name, entry in inventory.pools.items()}
    text = "# rbees pools inventory: edit by hand or with `rbees pools add|remove`.\n" + tomli_w.dumps(data)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        raise InventoryError(f"cannot write inventory {path}: {exc.strerror}") from exc


def update_inventory(path: Path, change: Callable[[Inventory], Inventory]) -> Inventory:
    """Read the inventory, apply ``change`` and write the result, holding a lock beside the file so
    that concurrent ``rbees pools add|remove`` do not lose each other's edits; returns what was read."""
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(lock_path, timeout=30):
            before = load_inventory(path)
            save_inventory(change(before), path)
    except Timeout:
        raise InventoryError(f"inventory {path} stayed locked for 30 s ({lock_path})") from None
    except OSError as exc:
        raise InventoryError(f"cannot lock inventory {path}: {exc.strerror or exc}") from exc
    return before


def validate_pool_name(name: str) -> str:
    if not re.fullmatch(_NAME_RE, name):
        raise InventoryError(
            f"invalid pool name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_destination(dest: str) -> tuple[str | None, str, int | None]:
    """Split ``[ssh://][user@]host[:port]`` (IPv6 in brackets) into (user, host, port)."""
    rest = dest.removeprefix("ssh://").rstrip("/")
    user: str | None = None
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        if not _USER_RE.fullmatch(user):
            raise InventoryError(f"invalid user name in SSH destination {dest!r}")
    port: int | None = None
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise InventoryError(f"invalid SSH destination {dest!r}")
        port_text = tail[1:] if tail else None
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    else:
        host, port_text = rest, None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise InventoryError(f"invalid port in SSH destination {dest!r}")
        port = int(port_text)
    check_destination_host(host, f"SSH destination {dest!r}")
    return user, host, port


def check_destination_host(host: str, where: str) -> str:
    if not host or host.startswith("-") or not _HOST_RE.fullmatch(host):
        raise InventoryError(f"invalid host in {where}: {host!r}")
    return host


def resolve_target(spec: str, inventory: Inventory) -> Target:
    """A ``--host`` value -> Target: a pool from the inventory, or a plain SSH destination plus defaults."""
    entry = inventory.pools.get(spec)
    if entry is not None:
        return _merge(spec, entry.host, entry, inventory.defaults)
    user, host, port = parse_destination(spec)
    layered = inventory.defaults.model_copy(
        update={k: v for k, v in {"user": user, "port": port}.items() if v is not None}
    )
    return _merge(spec, host, layered, PoolSettings())


def select_targets(hosts: list[str], all_pools: bool, inventory: Inventory) -> list[Target]:
    """The targets of one command: ``--host`` values in order (deduplicated), or every pool with ``--all``."""
    names = list(inventory.pools) if all_pools else []
    if all_pools and not names:
        raise InventoryError("--all: the inventory has no pools (add one with `rbees pools add`)")
    names += [h for h in hosts if h not in names]
    if not names:
        raise InventoryError("say where: --host NAME|DESTINATION (repeatable) or --all")
    return [resolve_target(name, inventory) for name in names]


def _merge(label: str, host: str, pool: PoolSettings, defaults: PoolSettings) -> Target:
    def pick(key: str) -> Any:
        value = getattr(pool, key)
        return getattr(defaults, key) if value is None else value

    install_dir = pick("install_dir")
    rbees_pool = pick("rbees_pool")
    fallback = rbees_pool is None and install_dir is None
    if rbees_pool is None:
        rbees_pool = f"{(install_dir or DEFAULT_INSTALL_DIR).rstrip('/')}/.venv/bin/rbees-pool"
    return Target(
        label=label,
        host=host,
        port=pick("port"),
        user=pick("user"),
        identity_file=_local_path(pick("identity_file")),
        known_hosts_file=_local_path(pick("known_hosts_file")),
        ssh_config=_local_path(pick("ssh_config")),
        connect_timeout=pick("connect_timeout") or DEFAULT_CONNECT_TIMEOUT_S,
        install_dir=install_dir or DEFAULT_INSTALL_DIR,
        rbees_pool=rbees_pool,
        path_fallback=fallback,
        python=pick("python") or DEFAULT_PYTHON,
        repo=pick("repo"),
        torch=pick("torch"),
        env={**defaults.env, **pool.env},
    )


def _local_path(value: str | None) -> str | None:
    return None if value is None else str(expand_home(value))


def check_settings(settings: PoolSettings, where: str) -> None:
    for key in settings.env:
        if not _ENV_KEY_RE.fullmatch(key):
            raise InventoryError(f"invalid environment variable name {key!r} in {where}")
    if settings.user is not None and not _USER_RE.fullmatch(settings.user):
        raise InventoryError(f"invalid user {settings.user!r} in {where}")
    for local in (settings.identity_file, settings.known_hosts_file, settings.ssh_config):
        if local is not None:
            expand_home(local)  # an unknown ~user is refused now, not at the first ssh command
    if settings.rbees_pool is not None:
        try:
            words = shlex.split(settings.rbees_pool)
        except ValueError as exc:
            raise InventoryError(f"invalid rbees_pool {settings.rbees_pool!r} in {where}: {exc}") from None
        if not words:
            raise InventoryError(f"empty rbees_pool in {where}")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}"
