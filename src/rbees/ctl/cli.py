"""The operator CLI ``rbees`` (alias ``llorch``): one Typer app assembled from its command groups."""

from __future__ import annotations

import typer

from rbees.ctl.jobs_cmds import register_job_commands
from rbees.ctl.pool_cmds import register_pool_commands

app = typer.Typer(
    name="rbees",
    help="Drive rbees pools over SSH, submit and follow jobs, and run a local cluster.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # like rbees-pool
)
register_pool_commands(app)
register_job_commands(app)


def main() -> None:
    app()
