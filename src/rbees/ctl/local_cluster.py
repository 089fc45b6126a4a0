"""The processes `rbees up` starts on this machine (an orchestrator and one CPU worker), and stopping them.

:class:`LocalCluster` runs each step (model in the pool, orchestrator up, worker spawned and seen healthy)
and undoes them all in :meth:`LocalCluster.stop`; :mod:`rbees.ctl.up` puts the steps in order and
handles the command line and signals.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from rbees.ctl.local_processes import (
    LOCAL,
    UpError,
    installed_program,
    kill_tree,
    log_tail,
    pid_is_running,
    poll_until_ready,
    port_is_free,
    signal_group,
    stderr_fd,
    wait_port_free,
)
from rbees.sdk import Client, RbeesSDKError, WorkerInfo


@dataclass
class LocalCluster:
    """The processes `rbees up` started, and how to stop them."""

    home: Path
    port: int
    model: str
    env: dict[str, str]
    console: Console
    orcd: subprocess.Popen[bytes] | None = None
    worker_id: str | None = None
    worker_pid: int | None = None
    worker_port: int | None = None
    workers_before: set[str] | None = None
    worker_log: Path | None = None
    served_model: str | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCAL}:{self.port}"

    @property
    def orcd_log(self) -> Path:
        return self.home / "logs" / "orcd.log"

    # --- running rbees-pool --------------------------------------------------------------------------

    def pool(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [installed_program("rbees-pool"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def pool_json(self, *args: str) -> Any:
        done = self.pool(*args, "--json")
        if done.returncode != 0:
            raise UpError(f"rbees-pool {' '.join(args)} failed: {done.stderr.strip() or done.returncode}")
        try:
            return json.loads(done.stdout)
        except ValueError as exc:
            raise UpError(f"rbees-pool {' '.join(args)} --json printed no JSON") from exc

    # --- the steps -----------------------------------------------------------------------------------

    def ensure_model(self) -> None:
        listed = self.pool_json("models", "list")
        entries = listed if isinstance(listed, list) else listed.get("models", [])
        if any(e.get("id") == self.model and e.get("downloaded", True) for e in entries):
            self.console.print(f"[green]✓[/] model [bold]{self.model}[/] is in the pool at {self.home}")
            return
        self.console.print(f"Installing model [bold]{self.model}[/] into {self.home} ...")
        # Its own progress goes straight to the terminal.
        done = subprocess.run(
            [installed_program("rbees-pool"), "models", "download", self.model],
            env=self.env,
            stdout=stderr_fd(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            raise UpError(f"`rbees-pool models download {self.model}` failed (exit {done.returncode})")
        self.console.print(f"[green]✓[/] model [bold]{self.model}[/] installed")

    def check_port(self) -> None:
        if not port_is_free(self.port):
            raise UpError(f"port {self.port} on {LOCAL} is already in use; pick another with --port")

    def start_orchestrator(self, timeout: float = 60.0) -> None:
        self.check_port()
        self.orcd_log.parent.mkdir(parents=True, exist_ok=True)
        args = [
            installed_program("rbees-orcd"),
            "--host",
            LOCAL,
            "--port",
            str(self.port),
            "--state-dir",
            str(self.home / "orcd"),
        ]
        with open(self.orcd_log, "ab") as log:
            self.orcd = subprocess.Popen(
                args,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        with (
            self.console.status("Starting the orchestrator ...") as status,
            Client(self.url, timeout=2.0) as client,
        ):
            poll_until_ready(
                lambda: _healthy(client),
                timeout,
                alive=self._orcd_alive,
                tick=lambda s: status.update(f"Starting the orchestrator ... {s:.0f} s"),
                what=f"rbees-orcd on port {self.port}",
                log=self.orcd_log,
            )
        self.console.print(f"[green]✓[/] orchestrator up at {self.url}")

    def spawn_worker(self, timeout: float) -> None:
        """`rbees-pool worker spawn` starts the worker and waits until the model is loaded."""
        # The pool picks the port (8001 upward, never one in use). Remember which workers existed
        # before, so an interrupted spawn's worker can still be found and stopped.
        self.workers_before = self._pool_worker_ids()
        args = [
            installed_program("rbees-pool"), "worker", "spawn", "cpu", "--model", self.model,
            "--advertise-host", LOCAL,
            "--orchestrator", self.url, "--timeout", str(int(timeout)), "--json",
        ]  # fmt: skip
        label = f"Loading {self.model} on a CPU worker"
        proc = subprocess.Popen(
            args,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        started = time.monotonic()
        try:
            with self.console.status(label + " ...") as status:
                while True:
                    try:
                        out, err = proc.communicate(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        status.update(f"{label} ... {time.monotonic() - started:.0f} s")
        finally:
            if proc.poll() is None:  # interrupted: let the pool CLI undo its half-done spawn
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(15)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if proc.returncode != 0:
            raise UpError(f"`rbees-pool worker spawn` failed:\n{err.strip() or proc.returncode}")
        try:
            record = json.loads(out)
        except ValueError as exc:
            raise UpError("`rbees-pool worker spawn --json` printed no JSON") from exc
        self.worker_id = str(record["worker_id"])
        self.worker_port = int(record["port"])
        self.worker_pid = int(record.get("pid") or 0) or None
        self.worker_log = self.home / "logs" / f"{self.worker_id}.log"
        self.console.print(
            f"[green]✓[/] worker {self.worker_id} loaded {self.model} in {time.monotonic() - started:.0f} s"
        )

    def wait_for_worker(self, timeout: float) -> WorkerInfo:
        started = time.monotonic()
        label = f"Waiting for the orchestrator to see worker {self.worker_id} healthy"
        with self.console.status(label + " ...") as status, Client(self.url, timeout=5.0) as client:
            info: WorkerInfo = poll_until_ready(
                lambda: self._our_worker(client),
                timeout,
                alive=lambda: self._orcd_alive() and self._worker_alive(),
                tick=lambda s: status.update(f"{label} ... {s:.0f} s"),
                what=f"worker {self.worker_id}",
                log=self.worker_log,
            )
        took = time.monotonic() - started
        self.console.print(f"[green]✓[/] the orchestrator lists {info.worker_id} as healthy ({took:.0f} s)")
        self.served_model = info.model or self.model
        return info

    def _our_worker(self, client: Client) -> WorkerInfo | None:
        try:
            workers = client.workers()
        except RbeesSDKError:
            return None
        return next((w for w in workers if w.worker_id == self.worker_id and w.ready), None)

    def _orcd_alive(self) -> bool:
        return self.orcd is not None and self.orcd.poll() is None

    def _worker_alive(self) -> bool:
        if self.worker_pid is None:
            return True
        return pid_is_running(self.worker_pid)

    def check_alive(self) -> None:
        if not self._orcd_alive():
            raise UpError(f"the orchestrator exited; its log ends with:\n{log_tail(self.orcd_log)}")
        if not self._worker_alive():
            log = log_tail(self.worker_log) if self.worker_log else ""
            raise UpError(f"worker {self.worker_id} exited; its log ends with:\n{log}")

    # --- stopping ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the worker, then the orchestrator; leave no process and no port behind."""
        self._stop_worker()
        self._stop_orchestrator()
        leftovers = [p for p in (self.port, self.worker_port) if p is not None and not wait_port_free(p)]
        if leftovers:
            self.console.print(f"[yellow]warning:[/] port(s) {leftovers} still in use after stopping")

    def _stop_worker(self) -> None:
        worker_id = self.worker_id or self._find_spawned_worker()
        if worker_id is None:
            return
        if self._orcd_alive():
            with contextlib.suppress(RbeesSDKError), Client(self.url, timeout=3.0) as client:
                client.remove_worker(worker_id)
        try:
            done = self.pool("worker", "stop", worker_id, timeout=60.0)
            ok = done.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if self.worker_pid is not None and (not ok or self._worker_alive()):
            kill_tree(self.worker_pid)

    def _pool_workers(self) -> list[dict[str, Any]]:
        try:
            listed = self.pool_json("worker", "list")
        except (UpError, subprocess.TimeoutExpired):
            return []
        entries = listed if isinstance(listed, list) else listed.get("workers", [])
        return [e for e in entries if isinstance(e, dict)]

    def _pool_worker_ids(self) -> set[str]:
        return {str(e.get("worker_id")) for e in self._pool_workers()}

    def _find_spawned_worker(self) -> str | None:
        """The worker an interrupted spawn left behind: one of our model that was not there before."""
        if self.workers_before is None:
            return None
        for entry in self._pool_workers():
            worker_id = str(entry.get("worker_id"))
            if worker_id not in self.workers_before and entry.get("model_id") == self.model:
                self.worker_pid = entry.get("pid") or self.worker_pid
                self.worker_port = entry.get("port") or self.worker_port
                return worker_id
        return None

    def _stop_orchestrator(self) -> None:
        proc = self.orcd
        if proc is None:
            return
        if proc.poll() is None:
            signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                signal_group(proc.pid, signal.SIGKILL)
                proc.wait(5)
        signal_group(proc.pid, signal.SIGKILL)  # anything left in its session


def _healthy(client: Client) -> bool | None:
    try:
        client.health()
    except RbeesSDKError:
        return None
    return True
