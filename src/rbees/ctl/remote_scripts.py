"""The POSIX shell scripts that ``rbees pool git|dev|test`` run in a pool's install directory.

Each function returns one script, with every value shell-quoted; they fail with a one-line
``rbees: ...`` message on stderr and exit code 3 when the pool is not ready for them.
"""

from __future__ import annotations

import shlex

from rbees.ctl.inventory import Target
from rbees.ctl.ssh import command_line, quote_remote_path

NOT_READY = 3
MIN_PYTHON = (3, 11)
# Never wait for a password or an editor: pulls over https/ssh fail instead of prompting.
_GIT_ENV = "GIT_TERMINAL_PROMPT=0 GIT_SSH_COMMAND='ssh -o BatchMode=yes' GIT_EDITOR=true"


def pool_command(target: Target, args: list[str]) -> str:
    """``rbees-pool ARGS...`` with the pool's configured command (or, with none configured, the
    default install dir's when it is there, else the one on the PATH)."""
    if not target.path_fallback:
        return command_line(target.rbees_pool, args)
    installed = command_line(target.rbees_pool, args)
    on_path = command_line("rbees-pool", args)
    return f"if [ -x {quote_remote_path(target.rbees_pool)} ]; then {installed}; else {on_path}; fi"


def git_pull(target: Target) -> str:
    return _in_checkout(
        target,
        f"{_GIT_ENV} git pull --ff-only --recurse-submodules && "
        f"{_GIT_ENV} git submodule update --init --recursive && git log -1 --format='now at %h %s'",
    )


def git_status(target: Target) -> str:
    return _in_checkout(target, "git status && git log -1 --format='HEAD %h %s (%cr)'")


def git_build(target: Target) -> str:
    """Reinstall the checkout into the pool's venv (editable), so new code and entry points take effect."""
    return _in_checkout(target, f"{_need_venv(target)} && .venv/bin/python -m pip install -e .")


def run_tests(target: Target, name: str | None) -> str:
    selection = ["-k", name] if name else []
    pytest = command_line(".venv/bin/python", ["-m", "pytest", *selection])
    return _in_checkout(target, f"{_need_venv(target)} && {pytest}")


def dev_setup(target: Target, *, repo: str | None, torch: str | None) -> str:
    """Bootstrap a pool; every step is skipped when already done, so it is safe to run again."""
    dir_ = quote_remote_path(target.install_dir)
    py = quote_remote_path(target.python)
    want = ", ".join(str(n) for n in MIN_PYTHON)
    lines = [
        f"PY={py}",
        'command -v "$PY" >/dev/null 2>&1 || '
        + _fail(f"{target.python} not found: install Python >= 3.11 or set the pool's python"),
        f"\"$PY\" -c 'import sys; sys.exit(sys.version_info < ({want},))' || "
        + _fail(f"{target.python} is older than 3.11: install a newer Python or set the pool's python"),
        'echo "python: $("$PY" -V 2>&1) ($(command -v "$PY"))"',
        f"if [ ! -f {dir_}/pyproject.toml ]; then",
    ]
    if repo:
        lines += [
            f"  echo {shlex.quote(f'checkout: cloning {repo} into {target.install_dir}')}",
            f"  {_GIT_ENV} git clone --recurse-submodules {shlex.quote(repo)} {dir_} || exit $?",
        ]
    else:
        lines.append(
            "  "
            + _fail(
                f"no rbees checkout in {target.install_dir}: clone it there, or pass --repo URL "
                "(or set repo in the inventory)"
            )
        )
    lines += [
        f"else echo {shlex.quote(f'checkout: {target.install_dir}')}; fi",
        f"cd {dir_} || exit {NOT_READY}",
        'if [ -x .venv/bin/python ]; then echo "venv: .venv exists"; '
        'else "$PY" -m venv .venv || exit $?; echo "venv: created .venv"; fi',
    ]
    if torch:
        lines.append(
            "if .venv/bin/python -c 'import torch' >/dev/null 2>&1; then echo 'torch: installed'; "
            f"else .venv/bin/python -m pip install {shlex.quote(torch)} || exit $?; fi"
        )
    lines += [
        "if [ -x .venv/bin/rbees-pool ]; then echo 'rbees: installed (`rbees pool git build` reinstalls)'; "
        "else .venv/bin/python -m pip install -e . || exit $?; fi",
        "if [ -x .venv/bin/hf ]; then echo 'hf: installed'; "
        "else .venv/bin/python -m pip install 'huggingface_hub[cli]' || exit $?; fi",
        ".venv/bin/rbees-pool --help >/dev/null || "
        + _fail(".venv/bin/rbees-pool does not run after install; see the output above"),
        f"echo {shlex.quote(f'ready: {target.install_dir}/.venv/bin/rbees-pool')}",
    ]
    return "\n".join(lines)


def _in_checkout(target: Target, script: str) -> str:
    dir_ = quote_remote_path(target.install_dir)
    missing = _fail(
        f"{target.install_dir} is not a directory on this host: clone rbees there, or run "
        f"`rbees pool dev setup --host {target.label} --repo URL`"
    )
    return f"{{ cd {dir_} 2>/dev/null || {missing}; }} && {script}"


def _need_venv(target: Target) -> str:
    return "[ -x .venv/bin/python ] || " + _fail(
        f"no virtual environment in {target.install_dir}/.venv: "
        f"run `rbees pool dev setup --host {target.label}`"
    )


def _fail(message: str) -> str:
    return f"{{ echo {shlex.quote('rbees: ' + message)} >&2; exit {NOT_READY}; }}"
