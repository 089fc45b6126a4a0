"""The shared path of every ``rbees pool ...`` command: pick hosts, run over SSH, merge, summarise, exit.

Exit codes: one host passes the remote exit code through (255 when ssh itself failed, 124 on
``--max-time``, 127 when the remote command is missing); several hosts give 0 when all succeeded, else 1.
Usage errors (unknown pool, bad inventory) exit 2.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from rbees.ctl.fanout import run_many, summary_lines
from rbees.ctl.inventory import (
    Inventory,
    InventoryError,
    Target,
    default_inventory_path,
    expand_home,
    load_inventory,
    select_targets,
)
from rbees.ctl.remote import RemoteResult
from rbees.ctl.render import Listing, merge_rows, merged_table
from rbees.ctl.ssh import Failure, FailureKind, SshSettings, default_control_dir, usable_control_dir

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

HostsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--host",
        "-H",
        help="Pool name from the inventory, or an SSH destination (user@host:port, ssh alias). Repeatable.",
        show_default=False,
    ),
]
AllOpt = Annotated[bool, typer.Option("--all", help="Every pool in the inventory.")]
InventoryOpt = Annotated[
    Path | None,
    typer.Option(
        "--inventory",
        envvar="RBEES_POOLS_FILE",
        help="Pools inventory file (default: ~/.config/rbees/pools.toml).",
        show_default=False,
    ),
]
ConnectTimeoutOpt = Annotated[
    int | None,
    typer.Option(
        "--connect-timeout",
        min=1,
        help="Seconds to wait for each SSH connection (default: 10).",
        show_default=False,
    ),
]
MaxTimeOpt = Annotated[
    float | None,
    typer.Option(
        "--max-time", min=0.1, help="Kill the remote command after this many seconds.", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON on stdout (several hosts: one merged list).")]


@dataclass(frozen=True)
class HostOptions:
    """The options every ``rbees pool`` command takes, as given on the command line."""

    hosts: list[str]
    all_pools: bool
    inventory: Path | None
    connect_timeout: int | None
    max_time: float | None

    @classmethod
    def of(
        cls,
        hosts: list[str] | None,
        all_pools: bool,
        inventory: Path | None,
        connect_timeout: int | None,
        max_time: float | None,
    ) -> HostOptions:
        return cls(list(hosts or []), all_pools, inventory, connect_timeout, max_time)


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``rbees: message`` on stderr; raise the returned Exit."""
    typer.echo(f"rbees: {message}", err=True)
    return typer.Exit(code)


def load_for(inventory_path: Path | None) -> tuple[Path, Inventory]:
    try:
        path = expand_home(inventory_path) if inventory_path else default_inventory_path()
        return path, load_inventory(path)
    except InventoryError as exc:
        raise fail(str(exc)) from exc


def resolve(opts: HostOptions) -> list[Target]:
    _path, inventory = load_for(opts.inventory)
    try:
        targets = select_targets(opts.hosts, opts.all_pools, inventory)
    except InventoryError as exc:
        raise fail(str(exc)) from exc
    if opts.connect_timeout is not None:
        targets = [_with_connect_timeout(t, opts.connect_timeout) for t in targets]
    return targets


def run_command(
    opts: HostOptions,
    script_for: Callable[[Target], str],
    *,
    program: Callable[[Target], str],
    listing: Listing | None = None,
    json_out: bool = False,
    json_arg: Callable[[Target], str] | None = None,
) -> None:
    """Run on every selected host and exit with the right code (raises ``typer.Exit``).

    ``listing`` commands with several hosts run ``json_arg`` (the script with ``--json``) and print one
    merged table, or merged JSON with ``json_out``.
    """
    targets = resolve(opts)
    ssh = SshSettings(control_dir=usable_control_dir(default_control_dir()))
    merge = len(targets) > 1 and (listing is not None) and json_arg is not None
    chosen = json_arg if merge and json_arg is not None else script_for
    out, err = sys.stdout.buffer, sys.stderr.buffer
    try:
        results = asyncio.run(
            run_many(
                targets,
                chosen,
                ssh=ssh,
                out=out,
                err=err,
                program=program,
                capture_stdout=merge,
                max_time=opts.max_time,
            )
        )
    except KeyboardInterrupt:
        raise fail("interrupted; ssh sessions were closed", EXIT_INTERRUPTED) from None
    if merge and listing is not None:
        results = _print_merged(listing, results, json_out)
    raise typer.Exit(_finish(results))


def _print_merged(listing: Listing, results: list[RemoteResult], json_out: bool) -> list[RemoteResult]:
    """Parse each host's JSON and print them as one; a host with unparsable output counts as failed."""
    parsed: list[tuple[str, Any]] = []
    checked: list[RemoteResult] = []
    for r in results:
        if r.ok:
            try:
                parsed.append((r.target.label, json.loads(r.stdout)))
            except ValueError:
                bad = Failure(FailureKind.EXIT, "rbees-pool printed no valid JSON (too old on this host?)")
                r = RemoteResult(r.target, 1, bad, r.stdout, r.elapsed_s)
        checked.append(r)
    rows = merge_rows(parsed)
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        sys.stdout.flush()
    else:
        console = Console(width=None if sys.stdout.isatty() else 200)
        console.print(merged_table(listing, rows, len(parsed)))
    return checked


def _finish(results: list[RemoteResult]) -> int:
    if len(results) == 1:
        (only,) = results
        if only.failure is not None and only.failure.kind is not FailureKind.EXIT:
            typer.echo(f"rbees: {only.target.label}: {only.failure.message}", err=True)
        return only.exit_code
    for line in summary_lines(results):
        typer.echo(line, err=True)
    return 0 if all(r.ok for r in results) else 1


def _with_connect_timeout(target: Target, seconds: int) -> Target:
    return replace(target, connect_timeout=seconds)
