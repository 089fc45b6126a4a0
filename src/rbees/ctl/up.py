"""`rbees up`: a one-machine cluster in one command.

It makes sure the model is in the local pool (``rbees-pool models download``), starts ``rbees-orcd``,
spawns a CPU worker with ``rbees-pool worker spawn`` that registers with it, waits until the
orchestrator lists the worker healthy, prints the endpoints, and then either streams one answer
(``--prompt``) or serves until Ctrl-C / SIGTERM. Whatever it started, it stops on the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import psutil
import typer
from rich.console import Console

from rbees.ctl.infer import stream_and_report
from rbees.ctl.streaming import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, build_request, cli_errors
from rbees.protocol import TaskRequest
from rbees.sdk import Client, RbeesSDKError, WorkerInfo

DEFAULT_MODEL = "smollm2-135m"
LOCAL = "127.0.0.1"

console = Console(stderr=True, highlight=False, soft_wrap=True)


class UpError(Exception):
    """A step of `rbees up` failed; the message says which and why."""


class _Stop(Exception):
    """SIGTERM or SIGHUP arrived."""


def _program(name: str) -> str:
    """A console script of this installation (next to the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UpError(f"{name} is not installed (it comes with the rbees package)")
    return found


def port_is_free(port: int, host: str = LOCAL) -> bool:
    """Whether a server could listen on ``port`` now (connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalCluster:
    """The processes `rbees up` started, and how to stop them."""

    home: Path
    port: int
    model: str
    env: dict[str, str]
    orcd: subprocess.Popen[bytes] | None = None
    worker_id: str | None = None
    worker_pid: int | None = None
    worker_port: int | None = None
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
            [_program("rbees-pool"), *args],
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
            console.print(f"[green]✓[/] model [bold]{self.model}[/] is in the pool at {self.home}")
            return
        console.print(f"Installing model [bold]{self.model}[/] into {self.home} ...")
        # Its own progress goes straight to the terminal.
        done = subprocess.run(
            [_program("rbees-pool"), "models", "download", self.model],
            env=self.env,
            stdout=_stderr_fd(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            raise UpError(f"`rbees-pool models download {self.model}` failed (exit {done.returncode})")
        console.print(f"[green]✓[/] model [bold]{self.model}[/] installed")

    def check_port(self) -> None:
        if not port_is_free(self.port):
            raise UpError(f"port {self.port} on {LOCAL} is already in use; pick another with --port")

    def start_orchestrator(self, timeout: float = 60.0) -> None:
        self.check_port()
        self.orcd_log.parent.mkdir(parents=True, exist_ok=True)
        args = [
            _program("rbees-orcd"),
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
            console.status("Starting the orchestrator ...") as status,
            Client(self.url, timeout=2.0) as client,
        ):
            _poll(
                lambda: _healthy(client),
                timeout,
                alive=self._orcd_alive,
                tick=lambda s: status.update(f"Starting the orchestrator ... {s:.0f} s"),
                what=f"rbees-orcd on port {self.port}",
                log=self.orcd_log,
            )
        console.print(f"[green]✓[/] orchestrator up at {self.url}")

    def spawn_worker(self, timeout: float) -> None:
        """`rbees-pool worker spawn` starts the worker and waits until the model is loaded."""
        self.worker_port = _free_port()
        args = [
            _program("rbees-pool"), "worker", "spawn", "cpu", "--model", self.model,
            "--port", str(self.worker_port), "--advertise-host", LOCAL,
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
            with console.status(label + " ...") as status:
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
        self.worker_pid = int(record.get("pid") or 0) or None
        self.worker_log = self.home / "logs" / f"{self.worker_id}.log"
        console.print(
            f"[green]✓[/] worker {self.worker_id} loaded {self.model} in {time.monotonic() - started:.0f} s"
        )

    def wait_for_worker(self, timeout: float) -> WorkerInfo:
        started = time.monotonic()
        label = f"Waiting for the orchestrator to see worker {self.worker_id} healthy"
        with console.status(label + " ...") as status, Client(self.url, timeout=5.0) as client:
            info: WorkerInfo = _poll(
                lambda: self._our_worker(client),
                timeout,
                alive=lambda: self._orcd_alive() and self._worker_alive(),
                tick=lambda s: status.update(f"{label} ... {s:.0f} s"),
                what=f"worker {self.worker_id}",
                log=self.worker_log,
            )
        took = time.monotonic() - started
        console.print(f"[green]✓[/] the orchestrator lists {info.worker_id} as healthy ({took:.0f} s)")
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
        try:
            return psutil.Process(self.worker_pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def check_alive(self) -> None:
        if not self._orcd_alive():
            raise UpError(f"the orchestrator exited; its log ends with:\n{_tail(self.orcd_log)}")
        if not self._worker_alive():
            log = _tail(self.worker_log) if self.worker_log else ""
            raise UpError(f"worker {self.worker_id} exited; its log ends with:\n{log}")

    # --- stopping ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the worker, then the orchestrator; leave no process and no port behind."""
        self._stop_worker()
        self._stop_orchestrator()
        leftovers = [p for p in (self.port, self.worker_port) if p is not None and not _wait_port_free(p)]
        if leftovers:
            console.print(f"[yellow]warning:[/] port(s) {leftovers} still in use after stopping")

    def _stop_worker(self) -> None:
        worker_id = self.worker_id or self._find_worker_by_port()
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
            _kill_tree(self.worker_pid)

    def _find_worker_by_port(self) -> str | None:
        if self.worker_port is None:
            return None
        try:
            listed = self.pool_json("worker", "list")
        except (UpError, subprocess.TimeoutExpired):
            return None
        entries = listed if isinstance(listed, list) else listed.get("workers", [])
        for entry in entries:
            if entry.get("port") == self.worker_port:
                self.worker_pid = entry.get("pid") or self.worker_pid
                return str(entry["worker_id"])
        return None

    def _stop_orchestrator(self) -> None:
        proc = self.orcd
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(5)
        _signal_group(proc.pid, signal.SIGKILL)  # anything left in its session


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _wait_port_free(port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not port_is_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _healthy(client: Client) -> bool | None:
    try:
        client.health()
    except RbeesSDKError:
        return None
    return True


def _poll(
    check: Callable[[], Any],
    timeout: float,
    *,
    alive: Callable[[], bool],
    tick: Callable[[float], None],
    what: str,
    log: Path | None,
) -> Any:
    """Call ``check`` until it returns something truthy; fail if ``alive`` turns false or time runs out."""
    started = time.monotonic()
    while True:
        result = check()
        if result:
            return result
        elapsed = time.monotonic() - started
        if not alive():
            tail = _tail(log) if log else ""
            raise UpError(
                f"{what} exited before it was ready" + (f"; its log ends with:\n{tail}" if tail else "")
            )
        if elapsed > timeout:
            raise UpError(f"{what} not ready after {timeout:.0f} s" + (f"; see {log}" if log else ""))
        tick(elapsed)
        time.sleep(0.25)


def print_endpoints(cluster: LocalCluster, worker: WorkerInfo) -> None:
    model = cluster.served_model or cluster.model
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 50})
    console.print()
    console.print("[bold]rbees is up[/]")
    console.print(f"  orchestrator   {cluster.url}   (health: {cluster.url}/health)")
    console.print(f"  OpenAI API     {cluster.url}/v1   (model {model!r})")
    console.print(f"  worker         {worker.worker_id} at {worker.uri}")
    console.print(f"  pool home      {cluster.home}   (logs in {cluster.home / 'logs'})")
    console.print()
    console.print("Try it:")
    console.print(
        f"  curl -N {cluster.url}/v2/tasks -H 'Content-Type: application/json' "
        f"-H 'Accept: text/event-stream' -d '{body}'",
        soft_wrap=True,
    )
    question = [{"role": "user", "content": "What is the capital of France?"}]
    chat = json.dumps({"model": model, "messages": question})
    console.print(
        f"  curl {cluster.url}/v1/chat/completions -H 'Content-Type: application/json' -d '{chat}'",
        soft_wrap=True,
    )
    console.print(f'  rbees infer --orchestrator {cluster.url} --prompt "Once upon a time"', soft_wrap=True)
    console.print()


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM and SIGHUP end `rbees up` like Ctrl-C does."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """While stopping, more Ctrl-C or SIGTERM only say that stopping is under way."""

    def handler(signum: int, frame: FrameType | None) -> None:
        console.print("[yellow]still stopping, one moment ...[/]")

    sigs: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def ask(cluster: LocalCluster, prompt: str, *, max_tokens: int, temperature: float, seed: int | None) -> int:
    """Stream one chat answer through the orchestrator; return the exit code."""
    with cli_errors(f"the orchestrator at {cluster.url}"), Client(cluster.url) as client:
        request = build_request(
            TaskRequest,
            {
                "model": cluster.served_model or cluster.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": seed,
            },
        )
        return stream_and_report(client.stream(request), client.cancel, as_json=False).exit_code


def serve(cluster: LocalCluster) -> None:
    console.print("Serving; press Ctrl-C to stop.")
    while True:
        cluster.check_alive()
        time.sleep(0.5)


def up(
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Ask this once, stream the answer, stop and exit.")
    ] = None,
    port: Annotated[int, typer.Option("--port", help="Orchestrator port (must be free).")] = 8080,
    home: Annotated[
        Path | None,
        typer.Option("--home", envvar="RBEES_HOME", help="Pool home (default ~/.rbees).", show_default=False),
    ] = None,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Catalog id of the model to serve.")
    ] = DEFAULT_MODEL,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="With --prompt.")] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="With --prompt; 0 is greedy (same answer each time).")
    ] = 0.0,
    seed: Annotated[int | None, typer.Option("--seed", help="With --prompt.")] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the worker to load the model.")
    ] = 600.0,
) -> None:
    """Run a local cluster (orchestrator + one CPU worker) until Ctrl-C, or answer one --prompt."""
    if not 1 <= port <= 65535:
        console.print(f"[red]error:[/] --port {port} is not a port")
        raise typer.Exit(EXIT_USAGE)
    pool_home = (home or Path.home() / ".rbees").expanduser().resolve()
    # The orchestrator `up` starts is configured by `up` alone, not by RBEES_ORCD_* left in the shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEES_ORCD_")}
    env["RBEES_HOME"] = str(pool_home)
    cluster = LocalCluster(home=pool_home, port=port, model=model, env=env)
    code = EXIT_FAILED
    try:
        with _signals_stop():
            cluster.check_port()
            cluster.ensure_model()
            cluster.start_orchestrator()
            cluster.spawn_worker(timeout)
            worker = cluster.wait_for_worker(timeout)
            print_endpoints(cluster, worker)
            if prompt is None:
                serve(cluster)
            else:
                code = ask(cluster, prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
    except UpError as exc:
        console.print(f"[red]error:[/] {exc}")
    except (KeyboardInterrupt, _Stop):
        code = EXIT_INTERRUPTED if prompt is not None else 0
        console.print()
    except typer.Exit as exc:
        code = exc.exit_code
    finally:
        with _shielded():
            if cluster.orcd is not None or cluster.worker_port is not None:
                with console.status("Stopping the worker and the orchestrator ..."):
                    cluster.stop()
                console.print("[green]✓[/] stopped everything `rbees up` started")
    raise typer.Exit(code)
