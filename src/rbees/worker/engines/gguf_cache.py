"""A converted copy of a GGUF model, so only the first load pays for GGUF parsing.

transformers reads a GGUF file by parsing its metadata three times and de-quantizing every
tensor (about 35 s for SmolLM2-135M on two cores). The result is an ordinary model, so it is
saved once as a Hugging Face directory (config.json, model.safetensors, tokenizer files) under
the cache dir, keyed by the file's path, size and mtime and the transformers version; later
loads read that directory in a second or two. Writing is atomic (a temp dir renamed into place)
and a failure to write only costs the speed-up, never the load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_FORMAT = 1
_MARKER = "rbees-gguf-cache.json"

log = logging.getLogger(__name__)


def cache_entry(cache_dir: Path, gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    key = json.dumps([_FORMAT, str(gguf.resolve()), st.st_size, st.st_mtime_ns, transformers.__version__])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{gguf.stem}-{digest}"


def lookup(cache_dir: Path, gguf: Path) -> Path | None:
    entry = cache_entry(cache_dir, gguf)
    return entry if (entry / _MARKER).is_file() else None


def store(cache_dir: Path, gguf: Path, model: Any, tokenizer: Any) -> Path | None:
    """Save the de-quantized ``model`` and its ``tokenizer``; return the entry, or None on failure."""
    from safetensors.torch import save_model

    entry = cache_entry(cache_dir, gguf)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    except OSError as exc:
        log.warning("not caching the converted GGUF model (%s)", exc)
        return None
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": str(gguf.resolve()), "format": _FORMAT}))
        os.replace(tmp, entry)
    except OSError as exc:
        log.warning("not caching the converted GGUF model (%s)", exc)
        shutil.rmtree(tmp, ignore_errors=True)
        return lookup(cache_dir, gguf)
    log.info("cached the converted GGUF model in %s", entry)
    return entry
