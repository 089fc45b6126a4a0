"""``rbees pools add|list|remove``: manage the pools inventory file."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from rbees.ctl.dispatch import InventoryOpt, JsonOpt, fail, load_for
from rbees.ctl.inventory import (
    Inventory,
    InventoryError,
    PoolEntry,
    check_settings,
    parse_destination,
    resolve_target,
    update_inventory,
    validate_pool_name,
)

pools_app = typer.Typer(help="The pools inventory (~/.config/rbees/pools.toml).", no_args_is_help=True)


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise fail(f"--env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


@pools_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Pool name used with --host.")],
    host: Annotated[
        str,
        typer.Option(
            "--host", "-H", help="SSH destination: host, user@host, user@host:port or an ssh alias."
        ),
    ],
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535)] = None,
    user: Annotated[str | None, typer.Option("--user")] = None,
    identity: Annotated[str | None, typer.Option("--identity", help="SSH private key file.")] = None,
    known_hosts: Annotated[str | None, typer.Option("--known-hosts", help="known_hosts file to use.")] = None,
    ssh_config: Annotated[str | None, typer.Option("--ssh-config", help="ssh config file (ssh -F).")] = None,
    connect_timeout: Annotated[int | None, typer.Option("--connect-timeout", min=1, max=600)] = None,
    install_dir: Annotated[
        str | None, typer.Option("--install-dir", help="rbees checkout on the pool (default: ~/rbees).")
    ] = None,
    rbees_pool: Annotated[
        str | None,
        typer.Option(
            "--rbees-pool",
            help="rbees-pool command on the pool (default: INSTALL_DIR/.venv/bin/rbees-pool; with no "
            "--install-dir either, ~/rbees/.venv/bin/rbees-pool where it exists, else rbees-pool on "
            "the PATH).",
        ),
    ] = None,
    python: Annotated[
        str | None, typer.Option("--python", help="Python for `pool dev setup` (default: python3).")
    ] = None,
    repo: Annotated[str | None, typer.Option("--repo", help="Git URL `pool dev setup` clones.")] = None,
    torch: Annotated[
        str | None, typer.Option("--torch", help="pip spec for torch in `pool dev setup`.")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="KEY=VALUE set for every remote command. Repeatable.")
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Overwrite an existing pool of this name.")
    ] = False,
    inventory: InventoryOpt = None,
) -> None:
    """Add a pool to the inventory."""
    path, _ = load_for(inventory)
    try:
        validate_pool_name(name)
        dest_user, dest_host, dest_port = parse_destination(host)
        entry = PoolEntry(
            host=dest_host,
            port=port or dest_port,
            user=user or dest_user,
            identity_file=identity,
            known_hosts_file=known_hosts,
            ssh_config=ssh_config,
            connect_timeout=connect_timeout,
            install_dir=install_dir,
            rbees_pool=rbees_pool,
            python=python,
            repo=repo,
            torch=torch,
            env=_env_pairs(env or []),
        )
        check_settings(entry, f"pool {name!r}")

        def added(inv: Inventory) -> Inventory:
            if name in inv.pools and not replace:
                raise InventoryError(f"pool {name!r} is already in {path}; add --replace to overwrite it")
            return inv.model_copy(update={"pools": {**inv.pools, name: entry}})

        inv = update_inventory(path, added)
    except (InventoryError, ValueError) as exc:
        raise fail(str(exc)) from exc
    typer.echo(
        f"{'replaced' if name in inv.pools else 'added'} pool {name} ({entry.host}) in {path}", err=True
    )


@pools_app.command("list")
def list_(json_out: JsonOpt = False, inventory: InventoryOpt = None) -> None:
    """The pools in the inventory, as SSH will reach them."""
    _path, inv = load_for(inventory)
    targets = [resolve_target(name, inv) for name in inv.pools]
    if json_out:
        rows = [{"name": name, **inv.pools[name].model_dump(exclude_none=True)} for name in inv.pools]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(box=box.SIMPLE_HEAD, title=f"Pools ({len(targets)})", title_justify="left")
    for column in ("Name", "Destination", "Install dir", "rbees-pool"):
        table.add_column(column, overflow="fold")
    for t in targets:
        table.add_row(t.label, t.where, t.install_dir, t.rbees_pool_label)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@pools_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="Pool name.")],
    inventory: InventoryOpt = None,
) -> None:
    """Remove a pool from the inventory (nothing on the pool is touched)."""
    path, _ = load_for(inventory)

    def removed(inv: Inventory) -> Inventory:
        if name not in inv.pools:
            raise LookupError(name)
        return inv.model_copy(update={"pools": {k: v for k, v in inv.pools.items() if k != name}})

    try:
        update_inventory(path, removed)
    except LookupError:
        raise fail(f"no pool named {name!r} in {path}", 1) from None
    except InventoryError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"removed pool {name} from {path}", err=True)
