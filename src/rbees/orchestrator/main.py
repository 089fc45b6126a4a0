"""``rbees-orcd``: parse flags, merge settings once (file, env, flags), serve with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from rbees.orchestrator.app import create_app
from rbees.orchestrator.registry import Registry
from rbees.orchestrator.settings import ENV_PREFIX, OrchestratorSettings, from_env, load_toml, merge_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rbees-orcd",
        description="The rbees orchestrator: admission, queue, scheduling and SSE relay in front of workers. "
        f"Every option can also be set in the TOML file or as {ENV_PREFIX}<NAME>.",
    )
    parser.add_argument("--config", type=Path, help=f"TOML config file (env {ENV_PREFIX}CONFIG)")
    for name, field in OrchestratorSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "~/.rbees/orcd" if name == "state_dir" else field.default
        help_text = field.description or name
        if default is not None:
            help_text += f" (default {default})"
        parser.add_argument(flag, dest=name, default=None, help=help_text)
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: dict[str, str] | None = None
) -> OrchestratorSettings:
    env = dict(os.environ if environ is None else environ)
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config") or env.get(ENV_PREFIX + "CONFIG")
    file_values: dict[str, Any] = load_toml(Path(config)) if config else {}
    return merge_settings(file_values, from_env(env), args)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = load_settings(argv)
        _check_state_dir(settings)
    except (ValidationError, ValueError, OSError, sqlite3.Error) as exc:
        print(f"rbees-orcd: error: {_brief(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    level = settings.log_level.upper()
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    print(
        f"rbees-orcd: serving on http://{settings.host}:{settings.port} (state {settings.state_dir})",
        file=sys.stderr,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=False,
        proxy_headers=False,  # nothing here uses the client's address; one middleware layer less
        timeout_graceful_shutdown=3,
        timeout_keep_alive=30,
    )


def _check_state_dir(settings: OrchestratorSettings) -> None:
    """The state directory and its database can be opened (and are, made if need be), so that a bad
    ``--state-dir`` is a one-line error before anything is served."""
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        Registry.open(settings.db_path).close()
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"state dir {settings.state_dir}: {reason}") from None


def _brief(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
    return str(exc)


if __name__ == "__main__":
    main()
