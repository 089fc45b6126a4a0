"""`rbees up`: a one-machine cluster in one command.

It makes sure the model is in the local pool (``rbees-pool models download``), starts ``rbees-orcd``,
spawns a CPU worker with ``rbees-pool worker spawn`` that registers with it, waits until the
orchestrator lists the worker healthy, prints the endpoints, and then either streams one answer
(``--prompt``) or serves until Ctrl-C / SIGTERM. Whatever it started, it stops on the way out.

This module is the command: the order of the steps, what it prints, and signals. The steps themselves
and stopping what they started are :class:`rbees.ctl.local_cluster.LocalCluster`; it (and the SDK) is
imported only when the command runs, so that ``rbees --help`` starts fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from rbees.ctl.infer import stream_and_report
from rbees.ctl.streaming import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, build_request, orchestrator_client
from rbees.protocol import TaskRequest

if TYPE_CHECKING:
    from rbees.ctl.local_cluster import LocalCluster
    from rbees.sdk import WorkerInfo

DEFAULT_MODEL = "smollm2-135m"

console = Console(stderr=True, highlight=False, soft_wrap=True)


class _Stop(Exception):
    """SIGTERM or SIGHUP arrived."""


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
    with orchestrator_client(cluster.url, None) as client:
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
    from rbees.ctl.local_cluster import LocalCluster
    from rbees.ctl.local_processes import UpError

    if not 1 <= port <= 65535:
        console.print(f"[red]error:[/] --port {port} is not a port")
        raise typer.Exit(EXIT_USAGE)
    pool_home = (home or Path.home() / ".rbees").expanduser().resolve()
    # The orchestrator `up` starts is configured by `up` alone, not by RBEES_ORCD_* left in the shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEES_ORCD_")}
    env["RBEES_HOME"] = str(pool_home)
    cluster = LocalCluster(home=pool_home, port=port, model=model, env=env, console=console)
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
