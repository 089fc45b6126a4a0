"""A real OpenSSH server on a loopback high port, with its own host key, config and authorized keys.

Needs ``/usr/sbin/sshd`` (Debian: ``apt-get install openssh-server``) and root (the tests log in as the
user running them). Stopping a server kills its per-connection children too, so no session, and no
client ControlMaster talking to it, outlives the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import psutil

from tests.support.procs import free_port

SSHD = "/usr/sbin/sshd"


def sshd_unavailable() -> str | None:
    """Why real-sshd tests cannot run here, or None."""
    if not Path(SSHD).exists():
        return f"{SSHD} missing: apt-get install openssh-server"
    if os.geteuid() != 0:
        return "sshd tests need root (sshd privilege separation)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "the OpenSSH client (ssh, ssh-keygen) is missing"
    return None


def keygen(path: Path) -> Path:
    """A passphrase-less ed25519 key pair at ``path`` / ``path.pub``; returns the private key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_suffix(".pub")):
        stale.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rbees-test", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    path.chmod(0o600)
    return path


class SshServer:
    """``sshd -D`` on 127.0.0.1:<free port>; use as a context manager or call start() / stop()."""

    def __init__(self, workdir: Path, authorized_keys: Path) -> None:
        self.workdir = workdir
        self.authorized_keys = authorized_keys
        self.host_key = workdir / "ssh_host_ed25519_key"
        self.config = workdir / "sshd_config"
        self.log = workdir / "sshd.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        keygen(self.host_key)

    @property
    def host_public_key(self) -> str:
        """``ssh-ed25519 AAAA...`` (type and key, no comment)."""
        return " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_public_key}\n"

    def new_host_key(self) -> None:
        """Replace the host key (takes effect on the next start)."""
        keygen(self.host_key)

    def start(self) -> SshServer:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for _attempt in range(5):
            self.port = self.port or free_port()
            self._write_config()
            self.log.write_bytes(b"")
            log = self.log.open("ab")
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            if self._wait_listening(10.0):
                return self
            self.stop()
            self.port = 0
        raise RuntimeError(f"sshd did not start; log:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        """Kill the listener and every session it started (they setsid, so not one process group)."""
        if self.proc is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> SshServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _write_config(self) -> None:
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "UseDNS no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "MaxStartups 50:30:100",
                    "LogLevel INFO",
                    "",
                ]
            )
        )

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if b"Server listening on" in self.log.read_bytes():
                return True
            time.sleep(0.02)
        return False
