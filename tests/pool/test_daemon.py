"""``rbees-pool serve``: the optional pool-manager daemon, as a real process on a free port."""

from __future__ import annotations

import contextlib
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.pool.helpers import first_port_at, rbees_pool, register_local, stub_env
from tests.pool.test_workers import spawn
from tests.support.procs import ManagedProcess, bin_path, free_port, get_json, wait_http

TOKEN = "pool-secret-token"


@contextlib.contextmanager
def daemon(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, ManagedProcess]]:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    cmd = [bin_path("rbees-pool"), "serve", "--port", str(port), *args]
    with ManagedProcess(cmd, env=env, log=log) as proc:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/health", timeout=30, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{proc.log_text()}") from None
        yield url, proc


def call(
    url: str, *, body: bytes | None = None, token: str | None = None, auth: str | None = None
) -> tuple[int, Any, dict[str, str]]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if auth is not None:
        headers["Authorization"] = auth
    req = urllib.request.Request(
        url, data=body, headers=headers, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def registration(worker_id: str, **extra: object) -> bytes:
    reg = {
        "worker_id": worker_id,
        "uri": "http://127.0.0.1:9",
        "model_ref": "tiny",
        "backend": "cpu",
        "device": "cpu",
        "slots_total": 1,
        "token": "worker-token-never-shown",
    }
    return json.dumps(reg | extra).encode()


def stop(proc: ManagedProcess, sig: int) -> int:
    proc.signal(sig)
    return proc.wait(15)


def test_health_workers_status_and_a_real_ready_callback(
    pool_home: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    register_local("tiny", tiny_llama)
    first_port_at(pool_home, free_port())
    with daemon(tmp_path) as (url, proc):
        health = get_json(f"{url}/health")
        assert set(health) == {"status", "workers", "gpus"}
        assert (health["status"], health["workers"]) == ("healthy", 0)
        assert isinstance(health["gpus"], int)
        assert get_json(f"{url}/workers") == []

        # A real rbees-workerd, spawned by the CLI, that also calls back to the daemon.
        workerd = f"{bin_path('rbees-workerd')} --callback-url {url}/callback"
        record = spawn(env={"RBEES_WORKERD": workerd})
        worker_id = str(record["worker_id"])
        try:
            status = get_json(f"{url}/status")
            health = get_json(f"{url}/health")
            assert health["status"] == "healthy"
            assert health["workers"] == 1
            assert health["gpus"] == len(status["gpus"]) + (1 if status["mps"] else 0)
            cli_status = json.loads(rbees_pool("status", "--json", check=True).stdout)
            assert len(cli_status["gpus"]) == len(status["gpus"])
            assert {k for k in status if k != "workers"} == {k for k in cli_status if k != "workers"}

            listed = json.loads(rbees_pool("worker", "list", "--json", check=True).stdout)
            deadline = time.monotonic() + 20
            while True:  # the worker's callback to the daemon may land just after spawn returned
                served = get_json(f"{url}/workers")
                if served[0]["ready_at"] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert [w["worker_id"] for w in served] == [w["worker_id"] for w in listed] == [worker_id]
            assert set(served[0]) == set(listed[0]) | {"ready_at"}
            assert served[0]["status"] == listed[0]["status"] == "Running"
            assert served[0]["ready_at"], "the worker's ready callback reached the daemon"
            assert [w["worker_id"] for w in status["workers"]] == [worker_id]
            assert "token" not in json.dumps(served) + json.dumps(status)

            # A valid callback by hand: 202, and the time is surfaced.
            code, body, _ = call(f"{url}/callback", body=registration(worker_id))
            assert (code, body["worker_id"], body["accepted"]) == (202, worker_id, True)
            assert get_json(f"{url}/workers")[0]["ready_at"] == body["ready_at"]

            # Invalid callbacks: the error envelope, 400, nothing recorded.
            for bad in (
                registration("bad id with spaces"),
                registration("w-1", slots_total=0),
                registration("w-1", surprise=True),
                b"{not json",
                b"",
                b"x" * (70 * 1024),
            ):
                code, body, _ = call(f"{url}/callback", body=bad)
                assert code == 400, body
                assert body["error"]["code"] == "INVALID_REQUEST"
                assert body["error"]["retriable"] is False
            code, body, _ = call(f"{url}/nowhere")
            assert (code, body["error"]["code"]) == (404, "NOT_FOUND")
        finally:
            rbees_pool("worker", "stop", worker_id, check=True)
        assert get_json(f"{url}/health")["workers"] == 0
        assert stop(proc, signal.SIGTERM) == 0
        assert "pool manager stopped" in proc.log_text()


def test_a_token_guards_every_route_but_health(tmp_path: Path) -> None:
    # A token makes a non-loopback bind acceptable; it comes from the environment here.
    with daemon(tmp_path, "--host", "0.0.0.0", env={"RBEES_POOL_TOKEN": TOKEN}) as (url, proc):
        assert get_json(f"{url}/health")["status"] == "healthy"
        for route in ("/workers", "/status"):
            for auth in (None, "Bearer wrong", f"Basic {TOKEN}", "Bearer"):
                code, body, headers = call(f"{url}{route}", auth=auth)
                assert (code, body["error"]["code"]) == (401, "UNAUTHORIZED")
                assert headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
            assert call(f"{url}{route}", token=TOKEN)[0] == 200
        code, body, _ = call(f"{url}/callback", body=registration("w-1"))
        assert (code, body["error"]["code"]) == (401, "UNAUTHORIZED")
        code, body, _ = call(f"{url}/callback", body=b"{broken", auth="Bearer wrong")
        assert code == 401, "auth is checked before the body"
        code, body, _ = call(f"{url}/callback", body=registration("w-1"), token=TOKEN)
        assert code == 202
        assert TOKEN not in proc.log_text()

        # A second daemon on the same port: a clear error, exit 4 (conflict).
        port = url.rsplit(":", 1)[1]
        done = rbees_pool("serve", "--host", "0.0.0.0", "--port", port, "--token", "x", timeout=30)
        assert done.returncode == 4, done.stderr
        assert f"cannot listen on 0.0.0.0:{port}" in done.stderr
        assert stop(proc, signal.SIGINT) == 0


def test_a_non_loopback_bind_without_a_token_is_refused(tmp_path: Path) -> None:
    port = free_port()
    done = rbees_pool("serve", "--host", "0.0.0.0", "--port", str(port), timeout=30)
    assert done.returncode == 2
    assert "refusing to bind 0.0.0.0 without a token" in done.stderr
    assert "RBEES_POOL_TOKEN" in done.stderr
    assert done.stdout == ""


def test_a_bad_port_exits_2() -> None:
    done = rbees_pool("serve", "--port", "70000", timeout=30)
    assert done.returncode == 2, done.stderr


def test_serve_has_help() -> None:
    from typer.testing import CliRunner

    from rbees.pool.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    assert "Usage: rbees-pool serve" in result.output
    for flag in ("--host", "--port", "--token", "RBEES_POOL_TOKEN", "9200", "127.0.0.1"):
        assert flag in result.output


def test_a_worker_spawned_without_a_callback_to_the_daemon_still_shows_when_it_was_ready(
    pool_home: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    register_local("tiny", tiny_llama)
    first_port_at(pool_home, free_port())
    with daemon(tmp_path) as (url, _):
        spawned = rbees_pool("worker", "spawn", "cpu", "--model", "tiny", "--json", env=stub_env())
        assert spawned.returncode == 0, spawned.stderr
        record = json.loads(spawned.stdout)
        try:
            assert record["ready_at"]  # recorded by the spawning CLI when the worker called it back
            served = get_json(f"{url}/workers")
            expected = [(record["worker_id"], record["ready_at"])]
            assert [(w["worker_id"], w["ready_at"]) for w in served] == expected
            assert get_json(f"{url}/status")["workers"][0]["ready_at"] == record["ready_at"]
        finally:
            rbees_pool("worker", "stop-all", "--timeout", "5")
