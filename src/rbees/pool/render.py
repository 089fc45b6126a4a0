"""Terminal output of the pool CLI: the spec's tables on stdout, progress and spinners on stderr."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from rbees.pool.catalog import CatalogEntry
from rbees.pool.workers import WorkerView


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    # Off a terminal (a pipe, an SSH command) keep rows on one line and print no colour codes.
    return Console(file=stream, stderr=stderr, width=None if tty else 160, highlight=False, soft_wrap=not tty)


def out() -> Console:
    return _console(stderr=False)


def err() -> Console:
    return _console(stderr=True)


def say(text: str) -> None:
    """A diagnostic line on stderr, printed verbatim."""
    err().print(text, markup=False, highlight=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _unicode_ok() -> bool:
    return (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") in ("utf8", "utf8mb4")


def human_size(n_bytes: int) -> str:
    if n_bytes >= 10**9:
        return f"{n_bytes / 1e9:.1f} GB"
    if n_bytes >= 10**6:
        return f"{n_bytes / 1e6:.0f} MB"
    if n_bytes >= 10**3:
        return f"{n_bytes / 1e3:.0f} kB"
    return f"{n_bytes} B" if n_bytes > 0 else "0 B"


def catalog_size(n_bytes: int) -> str:
    """The catalog's Size column, in GB with one decimal as the spec shows it ("0.9 GB", "0.0 GB" when
    not downloaded); a file too small to show that way (a test model) in smaller units."""
    if n_bytes <= 0 or n_bytes >= 5 * 10**7:
        return f"{max(0, n_bytes) / 1e9:.1f} GB"
    return human_size(n_bytes)


def _table(title: str, columns: Iterable[str]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in columns:
        table.add_column(col, no_wrap=True, justify="right" if col in ("Size", "Port", "PID") else "left")
    return table


def catalog_table(entries: list[CatalogEntry], host: str) -> Table:
    yes, no = ("✅", "❌") if _unicode_ok() else ("yes", "no")
    table = _table(f"Model Catalog for {host}", ["ID", "Name", "Downloaded", "Size"])
    for e in entries:
        table.add_row(e.id, e.name, yes if e.downloaded else no, catalog_size(e.size_bytes))
    table.caption = f"Total models: {len(entries)}"
    table.caption_justify = "left"
    return table


def models_table(entries: list[CatalogEntry], host: str, home: str) -> Table:
    table = _table(f"Downloaded Models on {host}", ["ID", "Name", "Architecture", "Format", "Size", "Path"])
    for e in entries:
        table.add_row(e.id, e.name, e.architecture, e.format, human_size(e.size_bytes), f"{home}/{e.path}")
    total = sum(e.size_bytes for e in entries)
    table.caption = f"Total models: {len(entries)} ({human_size(total)})"
    table.caption_justify = "left"
    return table


_STATUS_STYLE = {
    "Running": "green",
    "Loading": "yellow",
    "Starting": "yellow",
    "Dead": "red",
    "Unhealthy": "red",
}


def workers_table(views: list[WorkerView], title: str = "Active Workers") -> Table:
    table = _table(title, ["ID", "Backend", "Model", "Port", "PID", "Status"])
    for v in views:
        r = v.record
        style = _STATUS_STYLE.get(v.status, "")
        table.add_row(
            r.worker_id,
            r.backend.value,
            r.model_id,
            str(r.port),
            str(r.pid or "-"),
            f"[{style}]{v.status}[/]" if style else v.status,
        )
    table.caption = f"Total workers: {len(views)}"
    table.caption_justify = "left"
    return table


def status_tables(data: dict[str, Any]) -> list[Table]:
    host = _table(f"Pool {data['pool']} on {data['hostname']}", ["", ""])
    host.show_header = False
    backends = ", ".join(k for k, v in data["backends"].items() if v)
    cpu = data["cpu"]
    mem = data["memory"]
    host.add_row("Home", data["home"])
    host.add_row("Platform", data["platform"])
    host.add_row("Backends", backends)
    host.add_row("CPU", f"{cpu['cores_logical']} cores ({cpu['cores_physical'] or '?'} physical)")
    host.add_row("RAM", f"{human_size(mem['available_bytes'])} free of {human_size(mem['total_bytes'])}")
    host.add_row("Apple MPS", "available" if data["mps"] else "no")
    tables = [host]
    if data["gpus"]:
        gpus = _table("GPUs", ["Index", "Name", "Total", "Free"])
        for g in data["gpus"]:
            gpus.add_row(
                str(g["index"]),
                g["name"],
                human_size(g["memory_total_bytes"]),
                human_size(g["memory_free_bytes"]),
            )
        tables.append(gpus)
    return tables


class Spinner:
    """A spinner with a changing message on stderr; off a terminal, a line every 30 s of waiting."""

    def __init__(self, text: str) -> None:
        self.console = err()
        self.status = self.console.status(text) if self.console.is_terminal else None
        self._last = time.monotonic() - 20

    def __enter__(self) -> Spinner:
        if self.status is not None:
            self.status.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.status is not None:
            self.status.stop()

    def update(self, text: str) -> None:
        if self.status is not None:
            self.status.update(text)
        elif time.monotonic() - self._last >= 30:
            self._last = time.monotonic()
            self.console.print(text, markup=False, highlight=False)


class DownloadBar:
    """A byte progress bar on stderr (rich on a terminal, a line per file elsewhere)."""

    def __init__(self, label: str) -> None:
        self.console = err()
        self.label = label
        self.live = self.console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.live,
        )
        self.task: TaskID | None = None
        self.done = 0
        self.total = 0
        self._last_line = 0.0

    def __enter__(self) -> DownloadBar:
        self.progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def say(self, text: str) -> None:
        """A diagnostic line printed above the bar (a second console would garble it)."""
        self.progress.console.print(text, markup=False, highlight=False)

    def start(self, total_bytes: int, done_bytes: int, files: int) -> None:
        self.total, self.done = total_bytes, done_bytes
        self.task = self.progress.add_task(self.label, total=total_bytes or None, completed=done_bytes)
        self._last_line = time.monotonic()
        if done_bytes:
            self._line(f"resuming: {human_size(done_bytes)} of {human_size(total_bytes)} already here")

    def file(self, name: str, size: int | None) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=f"{self.label} {name}")
        if not self.live and (size or 0) >= 10**6:
            self._line(f"fetching {name} ({human_size(self.done)} of {human_size(self.total)} done)")

    def advance(self, n_bytes: int) -> None:
        self.done += n_bytes
        if self.task is not None:
            self.progress.advance(self.task, n_bytes)
        if not self.live and time.monotonic() - self._last_line > 30:
            self._last_line = time.monotonic()
            self._line(f"{human_size(self.done)} of {human_size(self.total)}")
