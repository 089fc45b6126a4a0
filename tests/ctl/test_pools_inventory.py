"""`rbees pools add|list|remove`: the inventory file a user keeps, and how `--host` reads it."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from rbees.ctl.cli import app
from rbees.ctl.inventory import load_inventory, resolve_target
from tests.support.procs import bin_path


class Done:
    """The bits of a CLI run the tests look at (stdout and stderr apart)."""

    def __init__(self, result: Result) -> None:
        self.returncode = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr


def rbees(*args: str, inventory: Path | None = None, env: dict[str, str] | None = None) -> Done:
    """The real `rbees` app, in-process (nothing here needs a separate process)."""
    extra = ["--inventory", str(inventory)] if inventory else []
    base_env = {"RBEES_POOLS_FILE": None, "COLUMNS": "200"}
    return Done(CliRunner().invoke(app, [*args, *extra], env={**base_env, **(env or {})}))


def test_add_list_remove_round_trip(tmp_path: Path) -> None:
    inv = tmp_path / "conf" / "pools.toml"
    added = rbees(
        "pools", "add", "mac", "--host", "vince@mac.home.arpa:2222", "--install-dir", "~/src/rbees",
        "--env", "RBEES_HOME=~/.rbees", "--env", "HF_HUB_OFFLINE=1", inventory=inv,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert added.stdout == "" and "added pool mac" in added.stderr
    assert rbees("pools", "add", "cpu-box", "--host", "blep", inventory=inv).returncode == 0

    data = tomllib.loads(inv.read_text())
    assert data["pools"]["mac"] == {
        "host": "mac.home.arpa",
        "port": 2222,
        "user": "vince",
        "install_dir": "~/src/rbees",
        "env": {"RBEES_HOME": "~/.rbees", "HF_HUB_OFFLINE": "1"},
    }
    listed = json.loads(rbees("pools", "list", "--json", inventory=inv).stdout)
    assert [p["name"] for p in listed] == ["mac", "cpu-box"]
    table = rbees("pools", "list", inventory=inv).stdout
    assert "vince@mac.home.arpa:2222" in table and "~/src/rbees/.venv/bin/rbees-pool" in table

    target = resolve_target("mac", load_inventory(inv))
    assert (target.host, target.port, target.user) == ("mac.home.arpa", 2222, "vince")

    removed = rbees("pools", "remove", "mac", inventory=inv)
    assert removed.returncode == 0
    assert [p["name"] for p in json.loads(rbees("pools", "list", "--json", inventory=inv).stdout)] == [
        "cpu-box"
    ]
    again = rbees("pools", "remove", "mac", inventory=inv)
    assert again.returncode == 1 and "no pool named 'mac'" in again.stderr


def test_adding_twice_needs_replace(tmp_path: Path) -> None:
    inv = tmp_path / "pools.toml"
    assert rbees("pools", "add", "ws", "--host", "ws1", inventory=inv).returncode == 0
    twice = rbees("pools", "add", "ws", "--host", "ws2", inventory=inv)
    assert twice.returncode == 2 and "--replace" in twice.stderr
    assert rbees("pools", "add", "ws", "--host", "ws2", "--replace", inventory=inv).returncode == 0
    assert load_inventory(inv).pools["ws"].host == "ws2"


def test_the_inventory_path_comes_from_the_environment(tmp_path: Path) -> None:
    inv = tmp_path / "elsewhere.toml"
    done = rbees("pools", "add", "p", "--host", "h", env={"RBEES_POOLS_FILE": str(inv)})
    assert done.returncode == 0, done.stderr
    assert "p" in load_inventory(inv).pools


def test_bad_input_is_refused_with_a_reason(tmp_path: Path) -> None:
    inv = tmp_path / "pools.toml"
    for args, needle in [
        (["pools", "add", "bad name", "--host", "h"], "invalid pool name"),
        (["pools", "add", "p", "--host", "-oProxyCommand=touch x"], "invalid host"),
        (["pools", "add", "p", "--host", "h", "--env", "NOEQUALS"], "KEY=VALUE"),
        (["pools", "add", "p", "--host", "h", "--env", "1BAD=x"], "invalid environment variable name"),
        (["pools", "add", "p", "--host", "h", "--rbees-pool", "'oops"], "No closing quotation"),
        (["pools", "add", "p", "--host", "h", "--rbees-pool", ""], "empty rbees_pool"),
        (["pools", "add", "p", "--host", "h", "--identity", "~no-such-user-here/k"], "no such user"),
    ]:
        done = rbees(*args, inventory=inv)
        assert done.returncode == 2 and needle in done.stderr, (args, done.stderr)
    assert not inv.exists()
    inv.write_text("[pools.x]\nhost = 'h'\nprot = 22\n")
    broken = rbees("pools", "list", inventory=inv)
    assert broken.returncode == 2 and "pools.x.prot" in broken.stderr
    inv.write_text("[pools\n")
    assert "not valid TOML" in rbees("pools", "list", inventory=inv).stderr
    nobody = rbees("pools", "list", inventory=Path("~no-such-user-here/pools.toml"))
    assert nobody.returncode == 2 and "no such user" in nobody.stderr


def test_concurrent_adds_and_removes_lose_no_edit(tmp_path: Path) -> None:
    inv = tmp_path / "pools.toml"
    assert rbees("pools", "add", "old", "--host", "h-old", inventory=inv).returncode == 0

    def run(*args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([bin_path("rbees"), "pools", *args, "--inventory", str(inv)])

    procs = [run("add", f"p{i}", "--host", f"h{i}") for i in range(8)] + [run("remove", "old")]
    assert [p.wait(timeout=120) for p in procs] == [0] * 9
    assert sorted(load_inventory(inv).pools) == [f"p{i}" for i in range(8)]


def test_minus_h_is_help_at_every_level_as_in_rbees_pool() -> None:
    for args in (["-h"], ["pools", "-h"], ["pools", "add", "-h"]):
        done = rbees(*args)
        assert done.returncode == 0 and "Usage: rbees" in done.stdout, (args, done.stderr)
