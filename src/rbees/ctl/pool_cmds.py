"""`rbees pool ...` and `rbees pools ...`: placeholder until the SSH commands land."""

from __future__ import annotations

import typer


def register_pool_commands(app: typer.Typer) -> None:
    """Mount `pool` and `pools` on the root app."""
