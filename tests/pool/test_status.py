"""``rbees-pool status``, settings, and the help of every command."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rbees.pool.cli import app
from tests.pool.helpers import first_port_at, rbees_pool, register_local, stub_env
from tests.support.procs import free_port


def test_status_json_describes_the_machine(pool_home: Path) -> None:
    data = json.loads(rbees_pool("status", "--json", check=True).stdout)
    assert data["hostname"] == socket.gethostname()
    assert data["pool"] == socket.gethostname()
    assert data["home"] == str(pool_home)
    assert data["backends"]["cpu"] is True
    assert data["backends"]["cuda"] == bool(data["gpus"])
    assert data["backends"]["metal"] is data["mps"]
    for gpu in data["gpus"]:
        assert {"index", "name", "memory_total_bytes", "memory_free_bytes"} <= set(gpu)
    assert data["cpu"]["cores_logical"] >= 1
    assert data["memory"]["total_bytes"] >= data["memory"]["available_bytes"] > 0
    assert data["workers"] == []
    assert [m["id"] for m in data["models"]] == ["smollm2-135m"]


def test_status_shows_workers_and_models(pool_home: Path, tiny_llama: Path) -> None:
    register_local("tiny", tiny_llama)
    first_port_at(pool_home, free_port())
    rbees_pool("worker", "spawn", "cpu", "--model", "tiny", env=stub_env(), check=True)
    try:
        data = json.loads(rbees_pool("status", "--json", check=True).stdout)
        assert [(w["model_id"], w["status"]) for w in data["workers"]] == [("tiny", "Running")]
        assert "token" not in json.dumps(data)
        text = rbees_pool("status", check=True).stdout
        for expected in (
            "Backends",
            "cpu",
            "RAM",
            "Workers",
            "Running",
            "Models: 2 in the catalog, 1 downloaded",
        ):
            assert expected in text
    finally:
        rbees_pool("worker", "stop-all", check=True)


def test_pool_toml_and_environment(pool_home: Path) -> None:
    pool_home.mkdir(parents=True)
    (pool_home / "pool.toml").write_text('name = "gpu-box"\n')
    assert json.loads(rbees_pool("status", "--json", check=True).stdout)["pool"] == "gpu-box"
    overridden = rbees_pool("status", "--json", env={"RBEES_POOL_NAME": "other"}, check=True)
    assert json.loads(overridden.stdout)["pool"] == "other"


@pytest.mark.parametrize("content", ["name = [", "first_port = 80\n", "surprise = 1\n"])
def test_a_bad_pool_toml_is_a_clear_error(pool_home: Path, content: str) -> None:
    pool_home.mkdir(parents=True)
    (pool_home / "pool.toml").write_text(content)
    done = rbees_pool("models", "catalog")
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert len(done.stderr.strip().splitlines()) == 1


def test_home_option_overrides_the_environment(tmp_path: Path) -> None:
    other = tmp_path / "other-home"
    rbees_pool("--home", str(other), "models", "register", "--id", "m", "--name", "M", "--repo", "o/m",
               "--architecture", "llama", check=True)  # fmt: skip
    assert (other / "catalog.json").is_file()


COMMANDS = [
    [], ["status"], ["models"], ["models", "register"], ["models", "download"], ["models", "catalog"],
    ["models", "list"], ["models", "unregister"], ["worker"], ["worker", "spawn"], ["worker", "list"],
    ["worker", "stop"], ["worker", "stop-all"], ["worker", "prune"],
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage: rbees-pool" in result.output
    assert len(result.output.splitlines()) > 4


def test_no_arguments_shows_help() -> None:
    result = CliRunner().invoke(app, [])
    assert "Commands" in result.output


def test_an_unreadable_worker_record_is_shown_and_prune_sets_it_aside(pool_home: Path) -> None:
    (pool_home / "workers").mkdir(parents=True)
    damaged = pool_home / "workers" / "worker-cpu-0badf00d.json"
    damaged.write_text('{"worker_id": "worker-cpu-0badf00d", "port": ')  # cut short
    listed = rbees_pool("worker", "list")
    assert listed.returncode == 0 and f"warning: {damaged} is no readable worker record" in listed.stderr
    stop = rbees_pool("worker", "stop", "worker-cpu-0badf00d")
    assert stop.returncode == 3 and "`rbees-pool worker prune` sets it aside" in stop.stderr
    pruned = rbees_pool("worker", "prune")
    assert pruned.returncode == 0 and "set aside the unreadable worker record" in pruned.stderr
    assert not damaged.exists() and damaged.with_name(damaged.name + ".unreadable").exists()
    assert "warning" not in rbees_pool("worker", "list").stderr
