"""Downloads from the Hugging Face hub (or anything speaking its API at ``HF_ENDPOINT``).

The file list, URLs, auth headers and the streaming GET (with in-run retries that resume by Range)
are huggingface_hub's. On top, each file is streamed into ``<model>/.rbees-download/parts/`` and only
moved into place once complete and verified, so a download interrupted in any way (network, Ctrl-C,
a killed process) resumes where it stopped the next time, as long as the repo's commit is the same.

Like ``hf download --include "*.safetensors" "*.json"`` plus tokenizer files, top-level files only;
pickled weights (``.bin``, ``.pt``) are never fetched. ``HF_TOKEN`` (or ``hf auth login``) is used
by huggingface_hub itself and never appears in any message.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, cast

from rbees.pool.errors import DownloadFailed
from rbees.pool.fsutil import atomic_write_json

HF_ALLOW_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken")
STATE_DIR = ".rbees-download"


class DownloadProgress(Protocol):
    def start(self, total_bytes: int, done_bytes: int, files: int) -> None: ...

    def file(self, name: str, size: int | None) -> None: ...

    def advance(self, n_bytes: int) -> None: ...


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None = None


@dataclass(frozen=True)
class HubPlan:
    repo: str
    commit: str
    files: list[RemoteFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass
class _State:
    commit: str
    completed: dict[str, int] = field(default_factory=dict)


def wanted(path: str) -> bool:
    return "/" not in path and any(fnmatch(path, pat) for pat in HF_ALLOW_PATTERNS)


def plan_download(repo: str, revision: str | None, file: str | None, *, endpoint: str | None) -> HubPlan:
    """Ask the hub for the repo's commit and files and pick the ones a worker needs."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
    siblings = info.siblings or []
    files = [
        RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs is not None else None)
        for s in siblings
        if (s.rfilename == file if file else wanted(s.rfilename))
    ]
    where = f"{repo}@{revision}" if revision else repo
    if file and not files:
        raise DownloadFailed(f"{file!r} is not a file of {where}")
    if not file and not any(f.path.endswith(".safetensors") for f in files):
        raise DownloadFailed(
            f"{where} has no top-level .safetensors weights (rbees never loads pickled .bin/.pt weights); "
            "for a GGUF repo register the model with --file"
        )
    if not file and not any(f.path == "config.json" for f in files):
        raise DownloadFailed(f"{where} has no config.json")
    if not info.sha:
        raise DownloadFailed(f"the hub did not say which commit {where} is at")
    return HubPlan(repo=repo, commit=str(info.sha), files=files)


def download_plan(plan: HubPlan, dest: Path, progress: DownloadProgress, *, endpoint: str | None) -> None:
    """Fetch every file of ``plan`` into ``dest``, resuming what an earlier run left."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # documented, not re-exported

    dest.mkdir(parents=True, exist_ok=True)
    state_dir = dest / STATE_DIR
    state = _load_state(state_dir, plan.commit)
    parts = state_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)

    def already(f: RemoteFile) -> int:
        final = dest / f.path
        if state.completed.get(f.path) == f.size and final.is_file() and final.stat().st_size == f.size:
            return f.size or 0
        part = parts / f"{f.path}.part"
        return part.stat().st_size if part.is_file() else 0

    progress.start(plan.total_bytes, sum(already(f) for f in plan.files), len(plan.files))
    headers = build_hf_headers()
    for f in plan.files:
        final = dest / f.path
        if state.completed.get(f.path) == f.size and final.is_file() and final.stat().st_size == f.size:
            continue
        progress.file(f.path, f.size)
        part = parts / f"{f.path}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        url = hf_hub_url(plan.repo, f.path, revision=plan.commit, endpoint=endpoint)
        with part.open("ab") as out:
            resumed = out.tell()
            if f.size is not None and resumed > f.size:
                out.truncate(0)
                progress.advance(-resumed)
                resumed = 0
            bar = functools.partial(_BarAdapter, progress, resumed)
            http_get(
                url,
                out,
                resume_size=resumed,
                headers=dict(headers),
                expected_size=f.size,
                tqdm_class=cast(Any, bar),
            )
        _verify(part, f)
        os.replace(part, final)
        state.completed[f.path] = final.stat().st_size
        atomic_write_json(state_dir / "state.json", {"commit": state.commit, "completed": state.completed})
    shutil.rmtree(state_dir, ignore_errors=True)


def _verify(part: Path, f: RemoteFile) -> None:
    size = part.stat().st_size
    if f.size is not None and size != f.size:
        part.unlink()
        raise DownloadFailed(f"{f.path}: got {size} bytes, expected {f.size}; run the download again")
    if f.sha256 is None:
        return
    digest = hashlib.sha256()
    with part.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    if digest.hexdigest() != f.sha256:
        part.unlink()
        raise DownloadFailed(f"{f.path}: sha256 mismatch (corrupt transfer); run the download again")


def _load_state(state_dir: Path, commit: str) -> _State:
    """The bookkeeping of an earlier run of the same commit, or a clean slate."""
    try:
        raw = json.loads((state_dir / "state.json").read_text())
        if raw.get("commit") == commit:
            return _State(commit=commit, completed={str(k): int(v) for k, v in raw["completed"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    # Parts without state, or of another commit, cannot be trusted.
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    atomic_write_json(state_dir / "state.json", {"commit": commit, "completed": {}})
    return _State(commit=commit)


class _BarAdapter:
    """The tqdm-like object huggingface_hub's ``http_get`` reports bytes to."""

    def __init__(self, sink: DownloadProgress, resumed: int, **kwargs: Any) -> None:
        self.sink = sink
        initial = int(kwargs.get("initial") or 0)
        if initial != resumed:  # the server ignored Range: the part file was rewound
            sink.advance(initial - resumed)

    def __enter__(self) -> _BarAdapter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def update(self, n: float | None = 1) -> None:
        self.sink.advance(int(n or 0))

    def close(self) -> None:
        return None


def describe_hub_error(exc: BaseException, repo: str) -> str:
    """One line for a failed hub call, never including credentials."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        msg = f"{repo} is gated: accept its terms on the hub and set HF_TOKEN"
    elif isinstance(exc, RepositoryNotFoundError):
        msg = f"repository {repo} not found on the hub (if it is private, set HF_TOKEN)"
    elif isinstance(exc, RevisionNotFoundError):
        msg = f"revision not found in {repo}"
    elif isinstance(exc, OfflineModeIsEnabled):
        msg = "the hub is switched off here (HF_HUB_OFFLINE is set)"
    elif isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        msg = f"the hub answered HTTP {status} for {repo}"
    else:
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no details'}"
    return redact(msg)


def redact(text: str) -> str:
    token = os.environ.get("HF_TOKEN")
    return text.replace(token, "***") if token else text
