"""`rbees pool git|dev|test` over SSH: a pool's checkout pulled from a local bare repository, bootstrapped,
rebuilt and tested, all on the far side of a real sshd."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ctl.conftest import PoolLab, write_fake_install

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    # Local-path submodules are refused by default since git 2.38.1.
    "GIT_CONFIG_COUNT": "2",
    "GIT_CONFIG_KEY_0": "protocol.file.allow",
    "GIT_CONFIG_VALUE_0": "always",
    "GIT_CONFIG_KEY_1": "init.defaultBranch",
    "GIT_CONFIG_VALUE_1": "main",
}


def git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def commit_file(repo: Path, name: str, text: str) -> str:
    (repo / name).write_text(text)
    git("add", name, cwd=repo)
    git("commit", "-q", "-m", f"write {name}", cwd=repo)
    git("push", "-q", "origin", "HEAD:main", cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


@pytest.fixture
def upstream(tmp_path: Path) -> tuple[Path, Path]:
    """A bare repo with a submodule (also a bare repo), and a working clone that pushes to both."""
    lib_bare, origin = tmp_path / "lib.git", tmp_path / "origin.git"
    git("init", "-q", "--bare", str(lib_bare))
    git("init", "-q", "--bare", str(origin))
    lib = tmp_path / "lib-work"
    git("clone", "-q", str(lib_bare), str(lib))
    commit_file(lib, "lib.txt", "lib v1\n")
    dev = tmp_path / "dev"
    git("clone", "-q", str(origin), str(dev))
    commit_file(dev, "README.md", "v1\n")
    git("submodule", "add", "-q", str(lib_bare), "lib", cwd=dev)
    git("commit", "-q", "-m", "add lib", cwd=dev)
    git("push", "-q", "origin", "HEAD:main", cwd=dev)
    return origin, dev


def test_git_pull_and_status_update_the_pool_checkout(pool_lab: PoolLab, upstream: tuple[Path, Path]) -> None:
    origin, dev = upstream
    checkout = pool_lab.root / "pool-checkout"
    git("clone", "-q", "--recurse-submodules", str(origin), str(checkout))
    pool_lab.add_pool("repo", pool_lab.lab.servers["a"], install_dir=str(checkout))
    pool_lab.set_env("repo", **{k: v for k, v in GIT_ENV.items() if k.startswith("GIT_CONFIG")})

    # Upstream moves on: a new commit and a new submodule commit.
    lib = pool_lab.root / "lib-work"
    git("pull", "-q", cwd=lib)
    commit_file(lib, "lib.txt", "lib v2\n")
    git("submodule", "update", "-q", "--remote", "lib", cwd=dev)
    git("add", "lib", cwd=dev)
    git("commit", "-q", "-m", "bump lib", cwd=dev)
    head = commit_file(dev, "README.md", "v2\n")

    pulled = pool_lab.rbees("pool", "git", "pull", "--host", "repo")
    assert pulled.returncode == 0, pulled.stderr
    assert git("rev-parse", "HEAD", cwd=checkout) == head
    assert (checkout / "README.md").read_text() == "v2\n"
    assert (checkout / "lib" / "lib.txt").read_text() == "lib v2\n"
    assert f"now at {head[:7]}" in pulled.stdout

    status = pool_lab.rbees("pool", "git", "status", "--host", "repo")
    assert status.returncode == 0, status.stderr
    assert "On branch main" in status.stdout and "up to date with 'origin/main'" in status.stdout
    assert f"HEAD {head[:7]} write README.md" in status.stdout


def test_git_pull_refuses_to_merge_diverged_history_instead_of_waiting(
    pool_lab: PoolLab, upstream: tuple[Path, Path]
) -> None:
    origin, dev = upstream
    checkout = pool_lab.root / "pool-checkout"
    git("clone", "-q", str(origin), str(checkout))
    (checkout / "local.txt").write_text("local change\n")
    git("add", "local.txt", cwd=checkout)
    git("commit", "-q", "-m", "local", cwd=checkout)
    commit_file(dev, "README.md", "upstream\n")
    pool_lab.add_pool("repo", pool_lab.lab.servers["a"], install_dir=str(checkout))
    pulled = pool_lab.rbees("pool", "git", "pull", "--host", "repo", timeout=60)
    assert pulled.returncode != 0
    assert "Not possible to fast-forward" in pulled.stderr or "fast-forward" in pulled.stderr


def test_git_commands_explain_a_missing_install_dir(pool_lab: PoolLab) -> None:
    pool_lab.add_pool("empty", pool_lab.lab.servers["a"], install_dir="/nonexistent/rbees")
    done = pool_lab.rbees("pool", "git", "status", "--host", "empty")
    assert done.returncode == 3
    assert "rbees: /nonexistent/rbees is not a directory on this host" in done.stderr


FAKE_PROJECT = Path(__file__).parent / "fake_project"


def test_dev_setup_clones_creates_the_venv_installs_and_is_safe_twice(
    pool_lab: PoolLab, upstream: tuple[Path, Path]
) -> None:
    origin, dev = upstream
    for source in FAKE_PROJECT.iterdir():
        if source.is_file():
            shutil.copy(source, dev / source.name)
    git("add", ".", cwd=dev)
    git("commit", "-q", "-m", "fake project", cwd=dev)
    git("push", "-q", "origin", "HEAD:main", cwd=dev)
    install = pool_lab.root / "fresh-pool"
    pool_lab.add_pool("dev", pool_lab.lab.servers["b"], install_dir=str(install))
    pool_lab.set_env(
        "dev",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        **{k: v for k, v in GIT_ENV.items() if k.startswith("GIT_CONFIG")},
    )
    pool_lab.pools["dev"]["python"] = str(Path(sys.base_prefix) / "bin" / "python3")
    pool_lab.write()

    first = pool_lab.rbees("pool", "dev", "setup", "--host", "dev", "--repo", str(origin), timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "venv: created .venv" in first.stdout and f"ready: {install}/.venv/bin/rbees-pool" in first.stdout
    assert (install / ".venv" / "bin" / "rbees-pool").exists()

    again = pool_lab.rbees("pool", "dev", "setup", "--host", "dev", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    for line in (f"checkout: {install}", "venv: .venv exists", "rbees: installed", "hf: installed"):
        assert line in again.stdout

    # The default rbees-pool of a pool is the one in its install dir's venv.
    status = pool_lab.rbees("pool", "status", "--host", "dev")
    assert status.stdout == "fake rbees-pool status\n", status.stderr

    (install / "fake_rbees.py").write_text('def main() -> None:\n    print("rebuilt")\n')
    built = pool_lab.rbees("pool", "git", "build", "--host", "dev", timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert pool_lab.rbees("pool", "status", "--host", "dev").stdout == "rebuilt\n"


def test_a_pool_with_no_install_dir_uses_the_default_ones_rbees_pool_else_the_path(pool_lab: PoolLab) -> None:
    # `pool dev setup` without --install-dir installs into ~/rbees: later commands must find it there.
    home = pool_lab.root / "remote-home"
    entry = pool_lab.add_pool("plain", pool_lab.lab.servers["a"])
    del entry["install_dir"]
    pool_lab.set_env("plain", HOME=str(home))  # the remote user's home, for this pool's commands
    missing = pool_lab.rbees("pool", "status", "--host", "plain")
    assert missing.returncode == 127
    assert "~/rbees/.venv/bin/rbees-pool, else rbees-pool on the PATH was not found" in missing.stderr
    write_fake_install(home / "rbees")
    found = pool_lab.rbees("pool", "status", "--host", "plain")
    assert found.returncode == 0, found.stderr
    listed = pool_lab.rbees("pools", "list")
    assert "else rbees-pool on the PATH" in listed.stdout


def test_dev_setup_refuses_an_old_python_and_a_missing_checkout(pool_lab: PoolLab) -> None:
    old = pool_lab.root / "python3.9"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    pool_lab.add_pool("old", pool_lab.lab.servers["a"], python=str(old), install_dir=str(pool_lab.root / "x"))
    done = pool_lab.rbees("pool", "dev", "setup", "--host", "old")
    assert done.returncode == 3
    assert f"rbees: {old} is older than 3.11" in done.stderr

    pool_lab.pools["old"]["python"] = str(Path(sys.base_prefix) / "bin" / "python3")
    pool_lab.write()
    done = pool_lab.rbees("pool", "dev", "setup", "--host", "old")
    assert done.returncode == 3
    assert "no rbees checkout in" in done.stderr and "--repo URL" in done.stderr


def test_pool_test_runs_pytest_in_the_install_dir(pool_lab: PoolLab) -> None:
    install = pool_lab.root / "tested-pool"
    (install / "tests").mkdir(parents=True)
    (install / "tests" / "test_fake.py").write_text(
        "def test_alpha():\n    assert True\n\n\ndef test_beta():\n    assert False, 'beta is broken'\n"
    )
    venv_bin = install / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv_bin / "python").chmod(0o755)
    pool_lab.add_pool("t", pool_lab.lab.servers["c"], install_dir=str(install))

    one = pool_lab.rbees("pool", "test", "alpha", "--host", "t")
    assert one.returncode == 0, one.stdout + one.stderr
    assert "1 passed, 1 deselected" in one.stdout
    everything = pool_lab.rbees("pool", "test", "--host", "t")
    assert everything.returncode == 1
    assert "beta is broken" in everything.stdout and "1 failed, 1 passed" in everything.stdout
