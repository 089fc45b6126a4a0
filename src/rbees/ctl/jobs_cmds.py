"""`rbees infer`, `rbees jobs ...` and `rbees up`: the data-plane commands of the operator CLI.

The modules imported here import the SDK (and with it aiohttp) only inside the commands, so that
``rbees --help`` and the pool commands do not pay for it at start-up; keep it that way.
"""

from __future__ import annotations

import typer

from rbees.ctl.infer import infer
from rbees.ctl.jobs import jobs_app
from rbees.ctl.up import up


def register_job_commands(app: typer.Typer) -> None:
    """Mount `infer`, `jobs` and `up` on the root app."""
    app.command("infer")(infer)
    app.add_typer(jobs_app, name="jobs")
    app.command("up")(up)
