"""What the pool CLI's command modules share: the ``--json`` option and the pool's settings."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from rbees.pool.settings import PoolSettings, load_settings

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]


def pool_settings(ctx: typer.Context) -> PoolSettings:
    """The pool's settings, from the environment the root command saw (``--home`` included)."""
    root = ctx.find_root()
    env = root.obj if isinstance(root.obj, dict) else dict(os.environ)
    return load_settings(env)
