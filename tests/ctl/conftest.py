"""Real sshd servers on loopback for the ``rbees pool`` tests, and a pools inventory pointing at them.

Three servers (pools ``a``, ``b``, ``c``) live for the whole session; tests that stop or re-key a
server start their own. The "remote" side is this machine: each pool gets its own ``RBEES_HOME`` and
an install directory whose ``.venv/bin/rbees-pool`` runs the real ``rbees-pool`` of this checkout
(after sleeping ``$RBEES_TEST_DELAY`` seconds, for the fan-out timing tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.ctl.sshd import SshServer, keygen, sshd_unavailable
from tests.support.procs import bin_path

POOL_NAMES = ("a", "b", "c")
REAL_RBEES_POOL = bin_path("rbees-pool")


@dataclass
class SshLab:
    """Keys, known_hosts, control-socket dir and sshd servers shared by the session."""

    base: Path
    user_key: Path
    authorized_keys: Path
    known_hosts: Path
    control_dir: Path
    servers: dict[str, SshServer] = field(default_factory=dict)
    extra: list[SshServer] = field(default_factory=list)

    def start_server(self, name: str, *, trusted: bool = True) -> SshServer:
        """Another sshd (for tests that stop or re-key it); ``trusted`` adds its key to known_hosts."""
        server = SshServer(self.base / f"sshd-{name}-{len(self.extra)}", self.authorized_keys).start()
        self.extra.append(server)
        if trusted:
            with self.known_hosts.open("a") as fh:
                fh.write(server.known_hosts_line())
        return server

    def defaults(self) -> dict[str, Any]:
        return {
            "user": "root",
            "identity_file": str(self.user_key),
            "known_hosts_file": str(self.known_hosts),
            "ssh_config": "/dev/null",
            "connect_timeout": 5,
        }


@pytest.fixture(scope="session")
def ssh_lab() -> Iterator[SshLab]:
    reason = sshd_unavailable()
    if reason:
        pytest.skip(reason)
    # Short paths: ControlPath sockets must fit in ~100 bytes.
    base = Path(tempfile.mkdtemp(prefix="rbees-ssh-"))
    user_key = keygen(base / "id_user")
    authorized = base / "authorized_keys"
    shutil.copy(user_key.with_suffix(".pub"), authorized)
    control_dir = base / "cm"
    control_dir.mkdir(mode=0o700)
    lab = SshLab(base, user_key, authorized, base / "known_hosts", control_dir)
    try:
        for name in POOL_NAMES:
            lab.servers[name] = SshServer(base / f"sshd-{name}", authorized).start()
        lab.known_hosts.write_text("".join(s.known_hosts_line() for s in lab.servers.values()))
        yield lab
    finally:
        for server in [*lab.servers.values(), *lab.extra]:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


def write_fake_install(install_dir: Path) -> Path:
    """An install dir whose venv's rbees-pool is this checkout's real one (optionally delayed)."""
    bin_dir = install_dir / ".venv" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "rbees-pool"
    script.write_text(
        "#!/bin/sh\n"
        'if [ -n "${RBEES_TEST_DELAY:-}" ]; then sleep "$RBEES_TEST_DELAY"; fi\n'
        f'exec {REAL_RBEES_POOL} "$@"\n'
    )
    script.chmod(0o755)
    return script


@dataclass
class PoolLab:
    """An inventory file naming pools a, b, c (one sshd each), and a way to run ``rbees`` against it."""

    lab: SshLab
    root: Path
    inventory: Path
    pools: dict[str, dict[str, Any]]
    defaults: dict[str, Any] = field(default_factory=dict)
    control_dir: Path | None = None

    def home(self, name: str) -> Path:
        return Path(self.pools[name]["env"]["RBEES_HOME"])

    def add_pool(self, name: str, server: SshServer, **overrides: Any) -> dict[str, Any]:
        entry = {**self.entry_for(name, server), **overrides}
        self.pools[name] = entry
        self.write()
        return entry

    def set_env(self, name: str, **env: str) -> None:
        self.pools[name]["env"].update(env)
        self.write()

    def write(self) -> None:
        data = {"defaults": {**self.lab.defaults(), **self.defaults}, "pools": self.pools}
        self.inventory.write_text(tomli_w.dumps(data))

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RBEES_POOLS_FILE": str(self.inventory),
            "RBEES_SSH_CONTROL_DIR": str(self.control_dir or self.lab.control_dir),
        }

    def rbees(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the real ``rbees`` console script."""
        return subprocess.run(
            [bin_path("rbees"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def local_pool(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``rbees-pool`` run directly (no SSH) against pool ``name``'s home: to check or clean up."""
        env = {**os.environ, **self.pools[name]["env"]}
        return subprocess.run(
            [REAL_RBEES_POOL, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    def entry_for(self, name: str, server: SshServer) -> dict[str, Any]:
        install = self.root / f"install-{name}"
        write_fake_install(install)
        return {
            "host": "127.0.0.1",
            "port": server.port,
            "install_dir": str(install),
            "env": {
                "RBEES_HOME": str(self.root / f"home-{name}"),
                "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1",
            },
        }


@pytest.fixture
def pool_lab(ssh_lab: SshLab, tmp_path: Path) -> Iterator[PoolLab]:
    lab = PoolLab(ssh_lab, tmp_path, tmp_path / "pools.toml", {})
    for name in POOL_NAMES:
        lab.pools[name] = lab.entry_for(name, ssh_lab.servers[name])
    lab.write()
    yield lab
    # Whatever a test spawned on a "remote" pool dies with it.
    for name in lab.pools:
        if list((lab.home(name) / "workers").glob("*.json")):
            lab.local_pool(name, "worker", "stop-all")
