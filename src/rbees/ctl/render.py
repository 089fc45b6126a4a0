"""Merging the ``--json`` listings of several pools into one list of rows and one table with a Host column.

Pure functions over parsed JSON; the table is a ``rich`` renderable for the caller to print.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from rich import box
from rich.table import Table


class Listing(StrEnum):
    STATUS = "status"
    CATALOG = "catalog"
    MODELS = "models"
    WORKERS = "workers"
    SPAWNED = "spawned"


_TITLES = {
    Listing.STATUS: ("Pool status", "pools"),
    Listing.CATALOG: ("Model catalog", "models"),
    Listing.MODELS: ("Downloaded models", "models"),
    Listing.WORKERS: ("Active workers", "workers"),
    Listing.SPAWNED: ("Spawned workers", "workers"),
}
_PREFERRED = {
    Listing.STATUS: ["hostname", "platform", "backends", "gpus", "workers", "models"],
    Listing.CATALOG: ["id", "name", "architecture", "format", "downloaded", "size_gb", "repo"],
    Listing.MODELS: ["id", "name", "architecture", "format", "size_gb", "path"],
    Listing.WORKERS: ["worker_id", "backend", "model_id", "port", "pid", "gpu", "status", "uri"],
    Listing.SPAWNED: ["worker_id", "backend", "model_id", "port", "pid", "gpu", "uri"],
}
_HOST = "host"
_HEADERS = {
    _HOST: "Host",
    "size_gb": "Size (GB)",
    "id": "ID",
    "worker_id": "Worker ID",
    "model_id": "Model",
    "pid": "PID",
    "gpu": "GPU",
    "gpus": "GPUs",
    "uri": "URI",
}


def rows_of(data: Any) -> list[dict[str, Any]]:
    """One pool's JSON as rows: a list is its items, ``{"models": [...]}`` its list, an object one row."""
    if isinstance(data, dict) and len(data) == 1:
        (only,) = data.values()
        if isinstance(only, list):
            data = only
    items = data if isinstance(data, list) else [data]
    return [item if isinstance(item, dict) else {"value": item} for item in items]


def merge_rows(per_host: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Rows of every host, each starting with ``host`` (a remote ``host`` field becomes ``remote_host``)."""
    merged: list[dict[str, Any]] = []
    for label, data in per_host:
        for row in rows_of(data):
            fields = {("remote_host" if key == _HOST else key): value for key, value in row.items()}
            merged.append({_HOST: label, **fields})
    return merged


def columns_for(listing: Listing, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Host first, then the listing's usual columns that occur, else every key in order of appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    preferred = [c for c in _PREFERRED.get(listing, []) if c in seen]
    rest = preferred or [k for k in seen if k != _HOST]
    return [_HOST, *rest]


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "✅" if value else "❌"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list):
        if not value:
            return "none"
        if all(not isinstance(v, dict | list) for v in value):
            return ", ".join(str(v) for v in value)
        return str(len(value))
    if isinstance(value, dict) and value and all(isinstance(v, bool) for v in value.values()):
        return ", ".join(k for k, v in value.items() if v) or "none"
    if isinstance(value, dict):
        text = json.dumps(value, separators=(",", ":"))
        return text if len(text) <= 40 else text[:39] + "…"
    return str(value)


def merged_table(listing: Listing, rows: Sequence[dict[str, Any]], hosts: int) -> Table:
    title, noun = _TITLES[listing]
    columns = columns_for(listing, rows)
    table = Table(
        title=f"{title} ({hosts} pool{'s' if hosts != 1 else ''})",
        caption=f"Total {noun}: {len(rows)}",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        caption_justify="left",
    )
    for column in columns:
        table.add_column(_HEADERS.get(column, column.replace("_", " ").title()), overflow="fold")
    for row in rows:
        table.add_row(*(cell(row.get(c)) for c in columns))
    return table
