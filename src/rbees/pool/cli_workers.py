"""``rbees-pool worker``: spawn, list, stop and prune this machine's workers."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rbees.pool import render
from rbees.pool.cli_common import JsonOpt, pool_settings
from rbees.pool.errors import PoolError
from rbees.protocol import Backend

worker_app = typer.Typer(
    help="Workers on this machine: spawn, list, stop.", no_args_is_help=True, rich_markup_mode=None
)


@worker_app.command("spawn")
def worker_spawn(
    ctx: typer.Context,
    backend: Annotated[
        Backend, typer.Argument(help="Where the model runs.", metavar="BACKEND", show_default=False)
    ],
    model: Annotated[
        str,
        typer.Option("--model", metavar="ID", help="Catalog id of a downloaded model.", show_default=False),
    ],
    gpu: Annotated[
        int | None, typer.Option("--gpu", metavar="N", min=0, help="GPU index (cuda, metal; default 0).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port", metavar="P", min=1, max=65535, help="Port (default: the first free one from 8001)."
        ),
    ] = None,
    slots: Annotated[
        int | None,
        typer.Option("--slots", metavar="N", min=1, max=1024, help="Concurrent jobs the worker accepts."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", metavar="N", min=1, help="torch CPU threads.")
    ] = None,
    prefill_batch_tokens: Annotated[
        int | None,
        typer.Option(
            "--prefill-batch-tokens",
            metavar="N",
            min=0,
            help="Padded tokens one batched prefill may take (rbees-workerd's default 4096; 0: off).",
        ),
    ] = None,
    refill_wait: Annotated[
        float | None,
        typer.Option(
            "--refill-wait",
            metavar="F",
            min=0,
            max=1,
            help="Share of a prefill's time the running jobs wait for a request to take an ended "
            "job's slot (rbees-workerd's default: 0.125 on a GPU, 0 on a CPU).",
        ),
    ] = None,
    prefill_gather: Annotated[
        float | None,
        typer.Option(
            "--prefill-gather",
            metavar="F",
            min=0,
            max=1,
            help="Share of a prefill's time an idle worker gathers a burst of requests into one "
            "prefill (rbees-workerd's default: 0.5 on a GPU, 0 on a CPU).",
        ),
    ] = None,
    orchestrator: Annotated[
        str | None,
        typer.Option(
            "--orchestrator",
            metavar="URL",
            help="Also register the worker with this orchestrator "
            "(default: $RBEES_ORCHESTRATOR or pool.toml).",
            show_default=False,
        ),
    ] = None,
    orchestrator_token: Annotated[
        str | None,
        typer.Option(
            "--orchestrator-token",
            metavar="T",
            help="Registration token for the orchestrator (better: $RBEES_ORCHESTRATOR_TOKEN).",
            show_default=False,
        ),
    ] = None,
    advertise_host: Annotated[
        str | None,
        typer.Option(
            "--advertise-host",
            metavar="H",
            help="Host name the orchestrator reaches the worker at (default: this host's name).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            metavar="BIND",
            help="Address to bind (default 127.0.0.1; 0.0.0.0 with a remote orchestrator).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", metavar="S", min=1, help="Seconds to wait for the model to load.")
    ] = 300,
    skip_memory_check: Annotated[
        bool, typer.Option("--skip-memory-check", help="Start even if free memory looks too small.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a worker for a downloaded model and wait until it is ready.

    Preflight first (model downloaded, backend present, free memory); then a free port, a
    per-worker token, rbees-workerd detached with its log in logs/<id>.log. On failure the
    worker is killed, no record is left, and the log's tail is shown.
    """
    from rbees.pool.spawn import SpawnRequest, callback_refused, orchestrator_knows, spawn_worker

    settings = pool_settings(ctx)
    req = SpawnRequest(
        backend=backend,
        model_id=model,
        gpu=gpu,
        port=port,
        slots=slots,
        threads=threads,
        prefill_batch_tokens=prefill_batch_tokens,
        refill_wait=refill_wait,
        prefill_gather=prefill_gather,
        host=host,
        orchestrator=orchestrator or settings.orchestrator,
        orchestrator_token=orchestrator_token or settings.orchestrator_token,
        advertise_host=advertise_host,
        timeout=timeout,
        check_memory=not skip_memory_check,
    )
    try:
        with render.Spinner("spawning") as spinner:
            record = spawn_worker(settings, req, status=spinner.update)
    except KeyboardInterrupt:
        render.say("interrupted: the worker was stopped and no record kept")
        raise typer.Exit(130) from None
    known = orchestrator_knows(record)
    refused = callback_refused(record) if known is not True else None
    if refused is not None:
        render.say(f"warning: {record.orchestrator} did not take {record.worker_id}: {refused}")
    elif known is False:
        render.say(
            f"warning: {record.orchestrator} does not list {record.worker_id}; "
            f"the worker's log says why: {record.log_path}"
        )
    if as_json:
        render.print_json(record.public())
        return
    render.say(f"worker {record.worker_id} is ready at {record.uri}")
    fields = {"worker_id": record.worker_id, "port": record.port, "pid": record.pid, "uri": record.uri}
    sys.stdout.write("".join(f"{k:<10} {v}\n" for k, v in fields.items()))


@worker_app.command("list")
def worker_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Workers of this pool with their live status (Running, Loading, Unhealthy, Dead)."""
    from rbees.pool.records import unreadable_records
    from rbees.pool.workers import list_workers

    settings = pool_settings(ctx)
    views = list_workers(settings)
    if as_json:
        render.print_json([v.public() for v in views])
    else:
        render.out().print(render.workers_table(views))
    for path in unreadable_records(settings):
        render.say(f"warning: {path} is no readable worker record; `rbees-pool worker prune` sets it aside")


@worker_app.command("token")
def worker_token(
    ctx: typer.Context,
    worker_id: Annotated[
        str, typer.Argument(help="Worker id (see `worker list`).", metavar="ID", show_default=False)
    ],
) -> None:
    """Print a worker's bearer token, to call it directly, e.g.
    curl -H "Authorization: Bearer $(rbees-pool worker token ID)" http://127.0.0.1:8001/execute ..."""
    from rbees.pool.records import get_record

    sys.stdout.write(get_record(pool_settings(ctx), worker_id).token + "\n")


StopTimeout = Annotated[
    float, typer.Option("--timeout", metavar="S", min=0, help="Seconds of grace before SIGKILL.")
]


@worker_app.command("stop")
def worker_stop(
    ctx: typer.Context,
    worker_id: Annotated[
        str, typer.Argument(help="Worker id (see `worker list`).", metavar="ID", show_default=False)
    ],
    timeout: StopTimeout = 30,
) -> None:
    """Stop one worker: SIGTERM, wait, SIGKILL after the timeout; remove its record."""
    from rbees.pool.stop import stop_worker

    _report_stop(stop_worker(pool_settings(ctx), worker_id, grace=timeout))


@worker_app.command("stop-all")
def worker_stop_all(ctx: typer.Context, timeout: StopTimeout = 30) -> None:
    """Stop every worker of this pool."""
    from rbees.pool.stop import stop_all

    results = stop_all(pool_settings(ctx), grace=timeout)
    failed = [r for r in results if isinstance(r, PoolError)]
    for r in results:
        if isinstance(r, PoolError):
            render.say(f"error: {r.message}")
        else:
            _report_stop(r)
    if not results:
        render.say("no workers")
    if failed:
        raise typer.Exit(failed[0].exit_code)


@worker_app.command("prune")
def worker_prune(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Remove the records of workers whose process is gone."""
    from rbees.pool.records import set_aside, unreadable_records
    from rbees.pool.workers import prune_workers

    settings = pool_settings(ctx)
    pruned = prune_workers(settings)
    aside = [set_aside(path) for path in unreadable_records(settings)]
    if as_json:
        render.print_json([r.public() for r in pruned])
    else:
        for r in pruned:
            render.say(f"pruned {r.worker_id} (port {r.port}, pid {r.pid})")
        render.say(f"{len(pruned)} dead worker record(s) removed")
    for path in aside:
        render.say(f"set aside the unreadable worker record {path}")


def _report_stop(result: object) -> None:
    from rbees.pool.stop import StopResult

    if not isinstance(result, StopResult):
        return
    how = "killed after the grace period" if result.killed else "stopped"
    what = how if result.was_running else "was not running; record removed"
    render.say(f"{result.worker_id}: {what}")
    if not result.port_released:
        render.say(f"warning: port {result.port} is still in use by another process")
    if result.deregistered is False:
        render.say("warning: could not deregister it from the orchestrator")
