"""`rbees pool ...` against real sshd servers on loopback, running the real `rbees-pool` on the far side."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from rbees.ctl.fanout import run_many
from rbees.ctl.inventory import load_inventory, resolve_target
from rbees.ctl.ssh import SshSettings
from tests.ctl.conftest import PoolLab, SshLab

NASTY_NAME = "a b; rm -rf ~ $(id) 'x' `touch pwned` \"$HOME\" *"


def _catalog(lab: PoolLab, *hosts: str) -> list[dict[str, object]]:
    args = ["pool", "models", "catalog", "--json"]
    for h in hosts:
        args += ["--host", h]
    done = lab.rbees(*args)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


def test_one_host_runs_rbees_pool_and_shows_its_output(pool_lab: PoolLab) -> None:
    done = pool_lab.rbees(
        "pool", "models", "register", "--host", "a", "--id", "qwen-0.5b", "--name", "Qwen2.5 0.5B Instruct",
        "--repo", "Qwen/Qwen2.5-0.5B-Instruct", "--architecture", "qwen",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = pool_lab.rbees("pool", "models", "catalog", "--host", "a")
    assert table.returncode == 0 and "Qwen2.5 0.5B Instruct" in table.stdout and "[a]" not in table.stdout
    assert [m["id"] for m in _catalog(pool_lab, "a") if m["id"] == "qwen-0.5b"] == ["qwen-0.5b"]
    # The other pools are other machines: nothing registered there.
    assert "qwen-0.5b" not in [m["id"] for m in _catalog(pool_lab, "b")]
    gone = pool_lab.rbees("pool", "models", "unregister", "qwen-0.5b", "--host", "a")
    assert gone.returncode == 0, gone.stderr
    assert "qwen-0.5b" not in [m["id"] for m in _catalog(pool_lab, "a")]


def test_remote_exit_codes_and_errors_pass_through(pool_lab: PoolLab) -> None:
    done = pool_lab.rbees("pool", "models", "download", "no-such-model", "--host", "a")
    assert done.returncode == 3  # rbees-pool: unknown model
    assert "no-such-model" in done.stderr


def test_metacharacters_arrive_as_one_literal_argument(pool_lab: PoolLab, tmp_path: Path) -> None:
    # Should quoting ever break, `rm -rf ~` hits a throwaway HOME with a canary in it.
    fake_home = tmp_path / "fake-home"
    fake_home.mkdir()
    (fake_home / "canary").write_text("still here")
    pool_lab.set_env("a", HOME=str(fake_home))
    done = pool_lab.rbees(
        "pool", "models", "register", "--host", "a", "--id", "nasty", "--name", NASTY_NAME,
        "--repo", "x/y", "--architecture", "llama",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    names = [m["name"] for m in _catalog(pool_lab, "a") if m["id"] == "nasty"]
    assert names == [NASTY_NAME]
    assert (fake_home / "canary").read_text() == "still here"
    assert (
        not list(Path(pool_lab.pools["a"]["install_dir"]).glob("pwned"))
        and not (fake_home / "pwned").exists()
    )


def test_a_plain_ssh_destination_works_without_an_inventory_entry(pool_lab: PoolLab, ssh_lab: SshLab) -> None:
    port = ssh_lab.servers["b"].port
    pool_lab.defaults = {"rbees_pool": pool_lab.pools["b"]["install_dir"] + "/.venv/bin/rbees-pool"}
    pool_lab.defaults["env"] = pool_lab.pools["b"]["env"]
    pool_lab.pools.clear()
    pool_lab.write()  # only [defaults]: key, known_hosts, rbees-pool command
    done = pool_lab.rbees("pool", "status", "--host", f"root@127.0.0.1:{port}", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["home"] == pool_lab.defaults["env"]["RBEES_HOME"]


def test_several_hosts_merge_listings_into_one_table_and_json(pool_lab: PoolLab) -> None:
    for name in ("a", "c"):
        reg = pool_lab.rbees(
            "pool", "models", "register", "-H", name, "--id", f"only-{name}", "--name", f"Only {name}",
            "--repo", "x/y", "--architecture", "llama",
        )  # fmt: skip
        assert reg.returncode == 0, reg.stderr
    rows = _catalog(pool_lab, "a", "b", "c")
    assert sorted((r["host"], r["id"]) for r in rows if str(r["id"]).startswith("only-")) == [
        ("a", "only-a"),
        ("c", "only-c"),
    ]
    assert {r["host"] for r in rows} == {"a", "b", "c"}
    table = pool_lab.rbees("pool", "models", "catalog", "--all")
    assert table.returncode == 0, table.stderr
    assert "Host" in table.stdout and "Only a" in table.stdout and "Only c" in table.stdout
    assert "summary: 3 ok, 0 failed" in table.stderr


def test_fan_out_streams_prefixed_lines_and_takes_as_long_as_the_slowest_host(pool_lab: PoolLab) -> None:
    for name in ("a", "b", "c"):
        pool_lab.set_env(name, RBEES_TEST_DELAY="2")
    started = time.monotonic()
    pool_lab.rbees("pool", "models", "download", "nope", "-H", "a")
    one_host = time.monotonic() - started
    started = time.monotonic()
    done = pool_lab.rbees("pool", "models", "download", "nope", "-H", "a", "-H", "b", "-H", "c")
    three_hosts = time.monotonic() - started
    for name in ("a", "b", "c"):
        assert f"[{name}] error: unknown model 'nope'" in done.stderr
        assert f"  {name}  failed: exit code 3" in done.stderr
    assert done.returncode == 1
    # One host after another would add 2 x (2 s sleep + rbees-pool) at least; in parallel they overlap,
    # with some CPU contention on a small machine.
    assert three_hosts < one_host + 3.0, (one_host, three_hosts)


def test_fan_out_engine_wall_time_is_the_slowest_host_not_the_sum(pool_lab: PoolLab, ssh_lab: SshLab) -> None:
    inventory = load_inventory(pool_lab.inventory)
    targets = [resolve_target(name, inventory) for name in ("a", "b", "c")]
    out, err = io.BytesIO(), io.BytesIO()
    ssh = SshSettings(control_dir=ssh_lab.control_dir)

    async def go() -> list[float]:
        # Warm the shared connections first, as repeated commands would.
        await run_many(targets, lambda t: "true", ssh=ssh, out=out, err=err, program=lambda t: "sh")
        started = time.monotonic()
        results = await run_many(
            targets,
            lambda t: f"sleep 1; echo done-{t.label}",
            ssh=ssh,
            out=out,
            err=err,
            program=lambda t: "sh",
        )
        assert all(r.ok for r in results)
        return [time.monotonic() - started]

    (elapsed,) = asyncio.run(go())
    assert 1.0 <= elapsed < 2.5
    assert sorted(out.getvalue().decode().split("\n")[:-1]) == ["[a] done-a", "[b] done-b", "[c] done-c"]


def test_a_stopped_host_fails_fast_with_one_line_while_the_others_succeed(
    pool_lab: PoolLab, ssh_lab: SshLab
) -> None:
    server = ssh_lab.start_server("stopped")
    pool_lab.add_pool("down", server)
    server.stop()
    started = time.monotonic()
    alone = pool_lab.rbees("pool", "worker", "list", "--host", "down")
    assert time.monotonic() - started < 5
    assert alone.returncode == 255
    assert (
        alone.stderr.strip()
        == f"rbees: down: cannot connect to root@127.0.0.1:{server.port}: connection refused "
        + ("(is sshd running?)")
    )
    both = pool_lab.rbees("pool", "worker", "list", "--host", "a", "--host", "down", "--json")
    assert both.returncode == 1
    assert json.loads(both.stdout) == []
    assert "summary: 1 ok, 1 failed" in both.stderr and "  down  failed: cannot connect" in both.stderr


def test_a_silent_host_times_out_instead_of_hanging(pool_lab: PoolLab, ssh_lab: SshLab) -> None:
    with socket.socket() as black_hole:  # accepts TCP, never says a word of SSH
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(8)
        port = black_hole.getsockname()[1]
        started = time.monotonic()
        done = pool_lab.rbees("pool", "status", "--host", f"127.0.0.1:{port}", "--connect-timeout", "1")
        assert time.monotonic() - started < 6
    assert done.returncode == 255
    assert "timed out after 1s" in done.stderr


def test_max_time_kills_a_command_that_runs_too_long(pool_lab: PoolLab) -> None:
    pool_lab.set_env("a", RBEES_TEST_DELAY="30")
    started = time.monotonic()
    done = pool_lab.rbees("pool", "worker", "list", "--host", "a", "--max-time", "1.5")
    assert time.monotonic() - started < 8
    assert done.returncode == 124
    assert "timed out after 1.5s" in done.stderr


def test_an_unknown_host_key_is_refused_with_the_fix(pool_lab: PoolLab, ssh_lab: SshLab) -> None:
    server = ssh_lab.start_server("unknown-key", trusted=False)
    pool_lab.add_pool("new", server)
    done = pool_lab.rbees("pool", "worker", "list", "--host", "new")
    assert done.returncode == 255
    fix = f"ssh-keyscan -p {server.port} 127.0.0.1 >> {ssh_lab.known_hosts}"
    assert "host key of root@127.0.0.1" in done.stderr and fix in done.stderr
    # Following the advice works.
    scan = subprocess.run(
        ["ssh-keyscan", "-p", str(server.port), "127.0.0.1"], capture_output=True, text=True, timeout=30
    )
    with ssh_lab.known_hosts.open("a") as fh:
        fh.write(scan.stdout)
    assert pool_lab.rbees("pool", "worker", "list", "--host", "new").returncode == 0


def test_a_changed_host_key_is_refused_even_after_a_good_connection(
    pool_lab: PoolLab, ssh_lab: SshLab
) -> None:
    server = ssh_lab.start_server("rekeyed")
    pool_lab.add_pool("rekeyed", server)
    # A control dir of its own (short: socket paths are limited), to watch the shared connection go.
    pool_lab.control_dir = Path(tempfile.mkdtemp(prefix="rbc-", dir=ssh_lab.base))
    assert pool_lab.rbees("pool", "worker", "list", "--host", "rekeyed").returncode == 0
    assert [p for p in pool_lab.control_dir.iterdir() if p.is_socket()]
    server.stop()
    _wait_for_no_master(pool_lab.control_dir)
    server.new_host_key()
    server.start()
    done = pool_lab.rbees("pool", "worker", "list", "--host", "rekeyed")
    assert done.returncode == 255
    assert "has CHANGED, refusing to connect" in done.stderr
    assert f"ssh-keygen -f {ssh_lab.known_hosts} -R '[127.0.0.1]:{server.port}'" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_a_key_the_server_does_not_accept_is_an_auth_failure(pool_lab: PoolLab, ssh_lab: SshLab) -> None:
    from tests.ctl.sshd import keygen

    stranger = keygen(ssh_lab.base / "id_stranger")
    pool_lab.add_pool("stranger", ssh_lab.servers["a"], identity_file=str(stranger), user="nobody")
    done = pool_lab.rbees("pool", "status", "--host", "stranger")
    assert done.returncode == 255
    assert "authentication to nobody@127.0.0.1 failed" in done.stderr


def test_a_missing_rbees_pool_says_how_to_install_it(pool_lab: PoolLab) -> None:
    pool_lab.add_pool("bare", pool_lab.lab.servers["a"], rbees_pool="/opt/nowhere/rbees-pool")
    done = pool_lab.rbees("pool", "status", "--host", "bare")
    assert done.returncode == 127
    assert "/opt/nowhere/rbees-pool was not found on bare" in done.stderr
    assert "rbees pool dev setup --host bare" in done.stderr


def test_an_unknown_pool_name_is_a_usage_error(pool_lab: PoolLab) -> None:
    done = pool_lab.rbees("pool", "status", "--host", "no such pool")
    assert done.returncode == 2 and "invalid host" in done.stderr
    assert pool_lab.rbees("pool", "status").returncode == 2


def _wait_for_no_master(control_dir: Path, timeout: float = 10.0) -> None:
    """After sshd is gone, its ControlMaster clients notice and remove their sockets."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [p for p in control_dir.iterdir() if p.is_socket()]
        if not any(_socket_alive(p) for p in live):
            return
        time.sleep(0.1)


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True
