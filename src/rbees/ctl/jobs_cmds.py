"""`rbees infer`, `rbees jobs ...` and `rbees up`: placeholder until they land."""

from __future__ import annotations

import typer


def register_job_commands(app: typer.Typer) -> None:
    """Mount `infer`, `jobs` and `up` on the root app."""
