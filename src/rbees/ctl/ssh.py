"""Pure SSH plumbing: the ``ssh`` argv, remote shell quoting, and turning failures into one clear line.

Nothing here starts a process (see ``rbees.ctl.remote``). The remote side is assumed to run a POSIX
login shell (sh, bash, zsh, dash); every argument is quoted with ``shlex.quote`` so it arrives as one
literal word, and a leading ``~/`` in a remote path becomes ``"$HOME"/...``.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from rbees.ctl.inventory import Target

# The remote shell prints this to stderr first: stderr before it is the ssh client's, after it the command's.
CONNECTED_MARKER = "__rbees_ssh_connected__"
CONTROL_PERSIST_S = 60
# Unix socket paths are limited to ~104 bytes; ssh adds ".XXXXXXXXXXXXXXXX" to %C (40 hex) while binding.
_MAX_CONTROL_DIR_LEN = 104 - 1 - 40 - 18


@dataclass(frozen=True)
class SshSettings:
    """How this machine runs ssh. ``control_dir`` None disables connection sharing."""

    control_dir: Path | None
    ssh_binary: str = "ssh"


def default_control_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where ssh keeps shared connections.

    ``$RBEES_SSH_CONTROL_DIR`` ('' or 'none' turns sharing off), else ``$XDG_RUNTIME_DIR/rbees-ssh``,
    else ``~/.ssh/rbees-cm``.
    """
    env = os.environ if environ is None else environ
    chosen = env.get("RBEES_SSH_CONTROL_DIR")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "none") else Path(chosen).expanduser()
    runtime = env.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "rbees-ssh" if runtime else Path.home() / ".ssh" / "rbees-cm"


def usable_control_dir(path: Path | None) -> Path | None:
    """Create the control-socket directory (0700); None when the path is unusable (too long, not ours)."""
    if path is None or len(str(path)) > _MAX_CONTROL_DIR_LEN or any(c.isspace() for c in str(path)):
        return None
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


def ssh_argv(target: Target, remote_command: str, settings: SshSettings) -> list[str]:
    """The full ``ssh`` command line for one remote command on one target."""
    argv = [settings.ssh_binary, "-T"]
    opts = [
        "BatchMode=yes",
        f"ConnectTimeout={target.connect_timeout}",
        "StrictHostKeyChecking=yes",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=3",
    ]
    if settings.control_dir is not None:
        opts += [
            "ControlMaster=auto",
            f"ControlPath={settings.control_dir}/%C",
            f"ControlPersist={CONTROL_PERSIST_S}",
        ]
    else:
        opts += ["ControlMaster=no", "ControlPath=none"]
    if target.identity_file:
        opts.append("IdentitiesOnly=yes")
    if target.known_hosts_file:
        opts.append(f"UserKnownHostsFile={_ssh_option_value(target.known_hosts_file)}")
    for opt in opts:
        argv += ["-o", opt]
    if target.ssh_config:
        argv += ["-F", target.ssh_config]
    if target.port:
        argv += ["-p", str(target.port)]
    if target.user:
        argv += ["-l", target.user]
    if target.identity_file:
        argv += ["-i", target.identity_file]
    return [*argv, "--", target.host, remote_command]


def quote_remote_path(path: str) -> str:
    """Quote a remote path, keeping a leading ``~/`` meaning the remote user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        rest = path[2:]
        return '"$HOME"/' + shlex.quote(rest) if rest else '"$HOME"/'
    return shlex.quote(path)


def command_line(program: str, args: Sequence[str]) -> str:
    """``program`` (a command line itself, e.g. ``~/rbees/.venv/bin/rbees-pool``) plus quoted ``args``."""
    words = shlex.split(program)
    if not words:
        raise ValueError("empty remote command")
    return " ".join(
        [quote_remote_path(words[0]), *(shlex.quote(w) for w in words[1:]), *map(shlex.quote, args)]
    )


def wrap_remote(script: str, env: Mapping[str, str]) -> str:
    """What ssh runs: the connected marker, the environment, then the script."""
    parts = [f"echo {CONNECTED_MARKER} >&2"]
    if env:
        parts.append("export " + " ".join(f"{key}={quote_remote_path(value)}" for key, value in env.items()))
    parts.append(script)
    return "; ".join(parts)


class FailureKind(StrEnum):
    UNREACHABLE = "unreachable"
    HOST_KEY_UNKNOWN = "host-key-unknown"
    HOST_KEY_CHANGED = "host-key-changed"
    AUTH = "auth"
    SSH = "ssh"
    CONNECTION_LOST = "connection-lost"
    COMMAND_MISSING = "command-missing"
    EXIT = "exit"
    TIMED_OUT = "timed-out"


EXIT_SSH = 255
EXIT_TIMED_OUT = 124
EXIT_COMMAND_MISSING = 127


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    message: str

    @property
    def exit_code(self) -> int:
        return {
            FailureKind.TIMED_OUT: EXIT_TIMED_OUT,
            FailureKind.COMMAND_MISSING: EXIT_COMMAND_MISSING,
        }.get(self.kind, EXIT_SSH)


def classify_failure(
    target: Target,
    rc: int,
    *,
    connected: bool,
    ssh_stderr: Sequence[str],
    remote_stderr: Sequence[str],
    program: str,
) -> Failure | None:
    """Why a finished ssh run failed, in one line, or None when it succeeded.

    ``ssh_stderr`` is what the ssh client printed before the remote shell started, ``remote_stderr`` the
    last lines after it; ``program`` is the remote command (for the 'not found' hint).
    """
    if rc == 0:
        return None
    if not connected:
        return _connect_failure(target, ssh_stderr)
    last = next((line.strip() for line in reversed(remote_stderr) if line.strip()), "")
    if rc == EXIT_SSH and _is_connection_lost(last):
        return Failure(FailureKind.CONNECTION_LOST, f"connection to {target.where} lost: {last}")
    if rc == EXIT_COMMAND_MISSING and any(_is_not_found(line) for line in remote_stderr):
        hint = (
            f"install it with `rbees pool dev setup --host {target.label}`, or point the inventory at it "
            f"(`rbees pools add NAME --host {target.where} --rbees-pool PATH --replace`)"
            if "rbees-pool" in program
            else "install it there"
        )
        return Failure(FailureKind.COMMAND_MISSING, f"{program} was not found on {target.label}: {hint}")
    return Failure(FailureKind.EXIT, f"exit code {rc}" + (f": {last}" if last else ""))


def _connect_failure(target: Target, lines: Sequence[str]) -> Failure:
    text = "\n".join(lines)
    known_hosts = target.known_hosts_file or "~/.ssh/known_hosts"
    port = target.port or 22
    if (
        "REMOTE HOST IDENTIFICATION HAS CHANGED" in text
        or "has changed and you have requested strict" in text
    ):
        key = _keyscan_name(text, target)
        return Failure(
            FailureKind.HOST_KEY_CHANGED,
            f"host key of {target.where} has CHANGED, refusing to connect (a man-in-the-middle, "
            "or the host was reinstalled). Only if you know why: "
            f"`ssh-keygen -f {known_hosts} -R {shlex.quote(key)}`, then "
            f"`ssh-keyscan -p {port} {target.host} >> {known_hosts}` and check the fingerprint",
        )
    if "Host key verification failed" in text or "host key is known for" in text:
        return Failure(
            FailureKind.HOST_KEY_UNKNOWN,
            f"host key of {target.where} is not known (strict checking is on). Check it and add it: "
            f"`ssh-keyscan -p {port} {target.host} >> {known_hosts}` (or run `ssh -p {port} {target.host}` "
            "once and accept it)",
        )
    if "Permission denied" in text or "Too many authentication failures" in text:
        who = f"{target.user}@{target.host}" if target.user else target.host
        return Failure(
            FailureKind.AUTH,
            f"authentication to {who} failed (keys only, never a password prompt). Load your key with "
            "`ssh-add` or set the pool's identity_file, and put its public key in ~/.ssh/authorized_keys "
            "there (`ssh-copy-id`)",
        )
    for needle, why in (
        ("Connection refused", "connection refused (is sshd running?)"),
        ("timed out", f"timed out after {target.connect_timeout}s (host down or unreachable?)"),
        ("Could not resolve hostname", "unknown host name"),
        ("No route to host", "no route to host"),
        ("Network is unreachable", "network is unreachable"),
        ("Connection reset", "connection reset during the handshake"),
        ("Connection closed by", "connection closed during the handshake"),
    ):
        if needle in text:
            return Failure(FailureKind.UNREACHABLE, f"cannot connect to {target.where}: {why}")
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no message")
    return Failure(FailureKind.SSH, f"ssh to {target.where} failed: {last}")


def _keyscan_name(text: str, target: Target) -> str:
    match = re.search(r'-R\s+"?([^"\s]+)"?', text) or re.search(r"Host key for (\S+) has changed", text)
    if match:
        return match.group(1)
    return f"[{target.host}]:{target.port}" if target.port and target.port != 22 else target.host


def _is_not_found(line: str) -> bool:
    return "not found" in line or "No such file or directory" in line


def _is_connection_lost(line: str) -> bool:
    return any(
        needle in line
        for needle in (
            "closed by remote host",
            "Broken pipe",
            "not responding",
            "Connection reset",
            "client_loop",
        )
    )


def _ssh_option_value(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) else value
