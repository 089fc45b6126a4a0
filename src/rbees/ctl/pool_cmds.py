"""``rbees pool ...``: every ``rbees-pool`` command, the git/dev/test operations, on one host or many.

Each command builds a remote script (``rbees.ctl.remote_scripts``) and hands it to
``rbees.ctl.dispatch.run_command``, which runs it over SSH on the chosen hosts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from rbees.ctl import remote_scripts as rs
from rbees.ctl.dispatch import (
    AllOpt,
    ConnectTimeoutOpt,
    HostOptions,
    HostsOpt,
    InventoryOpt,
    JsonOpt,
    MaxTimeOpt,
    run_command,
)
from rbees.ctl.inventory import Target
from rbees.ctl.inventory_cmds import pools_app
from rbees.ctl.render import Listing
from rbees.protocol.requests import Backend

pool_app = typer.Typer(
    help="Run rbees-pool and maintenance commands on pools over SSH (--host NAME, repeatable, or --all).",
    no_args_is_help=True,
)
models_app = typer.Typer(help="The model catalog and downloads on pools.", no_args_is_help=True)
worker_app = typer.Typer(help="Spawn, list and stop workers on pools.", no_args_is_help=True)
git_app = typer.Typer(help="Update the rbees checkout in a pool's install directory.", no_args_is_help=True)
dev_app = typer.Typer(help="Bootstrap a pool's Python environment.", no_args_is_help=True)
pool_app.add_typer(models_app, name="models")
pool_app.add_typer(worker_app, name="worker")
pool_app.add_typer(git_app, name="git")
pool_app.add_typer(dev_app, name="dev")


def register_pool_commands(app: typer.Typer) -> None:
    """Mount ``pool`` and ``pools`` on the root app."""
    app.add_typer(pool_app, name="pool")
    app.add_typer(pools_app, name="pools")


def _pool(
    opts: HostOptions, args: list[str], *, listing: Listing | None = None, json_out: bool = False
) -> None:
    """Run ``rbees-pool ARGS`` (plus ``--json`` when asked) on the hosts."""
    shown = [*args, "--json"] if json_out else args
    run_command(
        opts,
        lambda t: rs.pool_command(t, shown),
        program=lambda t: t.rbees_pool_label,
        listing=listing,
        json_out=json_out,
        json_arg=(lambda t: rs.pool_command(t, [*args, "--json"])) if listing else None,
    )


def _named(program: str) -> Callable[[Target], str]:
    return lambda _target: program


def _opt(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


@pool_app.command("status")
def status(
    host: HostsOpt = None,
    all_: AllOpt = False,
    json_out: JsonOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Backend and GPUs, workers and models of each pool (`rbees-pool status`)."""
    opts = HostOptions.of(host, all_, inventory, connect_timeout, max_time)
    _pool(opts, ["status"], listing=Listing.STATUS, json_out=json_out)


@models_app.command("register")
def models_register(
    model_id: Annotated[str, typer.Option("--id", help="Catalog id, e.g. qwen-0.5b.")],
    name: Annotated[str, typer.Option("--name", help="Display name.")],
    repo: Annotated[str, typer.Option("--repo", help="Hugging Face repo id.")],
    architecture: Annotated[str, typer.Option("--architecture", help="e.g. llama, qwen.")],
    file: Annotated[str | None, typer.Option("--file", help="One file of the repo (a GGUF).")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit.")] = None,
    host: HostsOpt = None,
    all_: AllOpt = False,
    json_out: JsonOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Add a model to the catalog of each pool (not downloaded yet)."""
    args = [
        "models",
        "register",
        "--id",
        model_id,
        "--name",
        name,
        "--repo",
        repo,
        "--architecture",
        architecture,
    ]
    args += _opt("--file", file) + _opt("--revision", revision)
    opts = HostOptions.of(host, all_, inventory, connect_timeout, max_time)
    _pool(opts, args, listing=Listing.CATALOG if json_out else None, json_out=json_out)


@models_app.command("download")
def models_download(
    model_id: Annotated[str, typer.Argument(help="Catalog id.")],
    from_: Annotated[
        str | None, typer.Option("--from", help="Copy from this path on the pool instead of the hub.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even if already downloaded.")] = False,
    host: HostsOpt = None,
    all_: AllOpt = False,
    json_out: JsonOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Download a registered model on each pool."""
    args = ["models", "download", model_id, *_opt("--from", from_), *(["--force"] if force else [])]
    opts = HostOptions.of(host, all_, inventory, connect_timeout, max_time)
    _pool(opts, args, listing=Listing.MODELS if json_out else None, json_out=json_out)


@models_app.command("catalog")
def models_catalog(
    host: HostsOpt = None,
    all_: AllOpt = False,
    json_out: JsonOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Every registered model (several hosts: one table with a Host column)."""
    opts = HostOptions.of(host, all_, inventory, connect_timeout, max_time)
    _pool(opts, ["models", "catalog"], listing=Listing.CATALOG, json_out=json_out)


@models_app.command("list")
def models_list(
    host: HostsOpt = None,
    all_: AllOpt = False,
    json_out: JsonOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Downloaded models only."""
    opts = HostOptions.of(host, all_, inventory, connect_timeout, max_time)
    _pool(opts, ["models", "list"], listing=Listing.MODELS, json_out=json_out)


@models_app.command("unregister")
def models_unregister(
    model_id: Annotated[str, typer.Argument(help="Catalog id.")],
    host: HostsOpt = None,
    all_: AllOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Remove a model from the catalog (its files stay)."""
    _pool(
        HostOptions.of(host, all_, inventory, connect_timeout, max_time), ["models", "unregister", model_id]
    )


@worker_app.command("spawn")
def worker_spawn(
    backend: Annotated[Backend, typer.Argument(help="cpu, cuda or metal.")],
    model: Annotated[str, typer.Option("--model", help="Catalog id of a downloaded model.")],
    gpu: Annotated[int | None, typer.Option("--gpu", help="GPU index.")] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Worker port (default: first free from 8001).")
    ] = None,
    slots: Annotated[int | None, typer.Option("--slots", help="Concurrent requests.")] = None,
    orchestrator: Annotated[
        str | None, typer.Option("--orchestrator", help="Orchestrator URL for the ready callback.")
    ] = None,
    orchestrator_token: Annotated[str | None, typer.Option("--orchestrator-token")] = None,
    advertise_host: Annotated[
        str | None, typer.Option("--advertise-host", help="Host name put in the worker's URI.")
    ] = None,
    bind: Annotated[
        str | None, typer.Option("--bind", help="Address the worker listens on (rbees-pool --host).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    prefill_batch_tokens: Annotated[
        int | None, typer.Option("--prefill-batch-tokens", min=0, help="Padded tokens per batched prefill.")
    ] = None,
    refill_wait: Annotated[
        float | None,
        typer.Option("--refill-wait", min=0, max=1, help="Share of a prefill's time to wait for a refill."),
    ] = None,
    prefill_gather: Annotated[
        float | None,
        typer.Option("--prefill-gather", min=0, max=1, help="Share of a prefill's time to gather a burst."),
    ] = None,
    skip_memory_check: Annotated[
        bool, typer.Option("--skip-memory-check", help="Start even if free memory looks too small.")
    ] = False,
    ready_timeout: Annotated[
        float | None, typer.Option("--timeout", help="Seconds to wait for the worker to be ready.")
    ] = None,
    json_out: JsonOpt = False,
    host: HostsOpt = None,
    all_: AllOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Start a worker for a model on each pool and wait until it is ready."""
    args = ["worker", "spawn", backend.value, "--model", model]
    args += _opt("--gpu", gpu) + _opt("--port", port) + _opt("--slots", slots)
    args += _opt("--orchestrator", orchestrator) + _opt("--orchestrator-token", orchestrator_token)
    args += _opt("--advertise-host", advertise_host) + _opt("--host", bind) + _opt("--timeout", ready_timeout)
    args += _opt("--threads", threads) + (["--skip-memory-check"] if skip_memory_check else [])
    args += _opt("--prefill-batch-tokens", prefill_batch_tokens) + _opt("--refill-wait", refill_wait)
    args += _opt("--prefill-gather", prefill_gather)
    opts = HostOptions.of(host, all_, inventory, connect_timeout, max_time)
    _pool(opts, args, listing=Listing.SPAWNED if json_out else None, json_out=json_out)


@worker_app.command("list")
def worker_list(
    host: HostsOpt = None,
    all_: AllOpt = False,
    json_out: JsonOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Workers running on each pool."""
    opts = HostOptions.of(host, all_, inventory, connect_timeout, max_time)
    _pool(opts, ["worker", "list"], listing=Listing.WORKERS, json_out=json_out)


WorkerIdArg = Annotated[str, typer.Argument(help="Worker id (see `rbees pool worker list`).")]
GraceOpt = Annotated[
    float | None, typer.Option("--timeout", min=0, help="Seconds of grace before SIGKILL (pool default 30).")
]


@worker_app.command("token")
def worker_token(
    worker_id: WorkerIdArg,
    host: HostsOpt = None,
    all_: AllOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Print a worker's bearer token, to call it directly (`rbees infer --worker HOST:PORT --token T`)."""
    _pool(HostOptions.of(host, all_, inventory, connect_timeout, max_time), ["worker", "token", worker_id])


@worker_app.command("stop")
def worker_stop(
    worker_id: WorkerIdArg,
    timeout: GraceOpt = None,
    host: HostsOpt = None,
    all_: AllOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Stop one worker (SIGTERM, then SIGKILL after a grace period)."""
    args = ["worker", "stop", worker_id, *_opt("--timeout", timeout)]
    _pool(HostOptions.of(host, all_, inventory, connect_timeout, max_time), args)


@worker_app.command("stop-all")
def worker_stop_all(
    timeout: GraceOpt = None,
    host: HostsOpt = None,
    all_: AllOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Stop every worker on each pool."""
    args = ["worker", "stop-all", *_opt("--timeout", timeout)]
    _pool(HostOptions.of(host, all_, inventory, connect_timeout, max_time), args)


@worker_app.command("prune")
def worker_prune(
    host: HostsOpt = None,
    all_: AllOpt = False,
    json_out: JsonOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Forget the records of workers that are no longer running."""
    opts = HostOptions.of(host, all_, inventory, connect_timeout, max_time)
    _pool(opts, ["worker", "prune"], listing=Listing.WORKERS if json_out else None, json_out=json_out)


@git_app.command("pull")
def git_pull(
    host: HostsOpt = None,
    all_: AllOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """`git pull --ff-only --recurse-submodules` and update submodules in the install directory."""
    run_command(
        HostOptions.of(host, all_, inventory, connect_timeout, max_time), rs.git_pull, program=_named("git")
    )


@git_app.command("status")
def git_status(
    host: HostsOpt = None,
    all_: AllOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """`git status` and the checked-out commit of the install directory."""
    run_command(
        HostOptions.of(host, all_, inventory, connect_timeout, max_time), rs.git_status, program=_named("git")
    )


@git_app.command("build")
def git_build(
    host: HostsOpt = None,
    all_: AllOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Reinstall the checkout into the pool's venv (`.venv/bin/python -m pip install -e .`)."""
    run_command(
        HostOptions.of(host, all_, inventory, connect_timeout, max_time), rs.git_build, program=_named("pip")
    )


@dev_app.command("setup")
def dev_setup(
    repo: Annotated[
        str | None,
        typer.Option("--repo", help="Git URL to clone when the install directory has no checkout."),
    ] = None,
    torch: Annotated[
        str | None,
        typer.Option("--torch", help="pip spec installed first when torch is missing, e.g. 'torch==2.13.0'."),
    ] = None,
    host: HostsOpt = None,
    all_: AllOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Check Python >= 3.11, create the venv, install rbees and the `hf` CLI. Safe to run again."""
    run_command(
        HostOptions.of(host, all_, inventory, connect_timeout, max_time),
        lambda t: rs.dev_setup(t, repo=repo or t.repo, torch=torch or t.torch),
        program=_named("python"),
    )


@pool_app.command("test")
def test(
    name: Annotated[str | None, typer.Argument(help="Run only tests matching this (pytest -k).")] = None,
    host: HostsOpt = None,
    all_: AllOpt = False,
    inventory: InventoryOpt = None,
    connect_timeout: ConnectTimeoutOpt = None,
    max_time: MaxTimeOpt = None,
) -> None:
    """Run the project's tests (or those matching NAME) in the install directory."""
    run_command(
        HostOptions.of(host, all_, inventory, connect_timeout, max_time),
        lambda t: rs.run_tests(t, name),
        program=_named("pytest"),
    )
