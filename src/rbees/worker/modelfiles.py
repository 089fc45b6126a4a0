"""Checking a model path before anything loads it: what it is, and whether it is whole and safe.

A model is a Hugging Face directory (config.json + *.safetensors + tokenizer files) or a GGUF
file (or a directory holding exactly one). The checks read only headers, so they take
milliseconds, and they name the problem: missing, truncated, corrupt, pickle weights
(``.bin``/``.pt``, never unpickled) or a config that needs ``trust_remote_code``.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


class ModelFileError(Exception):
    """The model path cannot be served; the message says why."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A checked model: ``path`` is the directory (``hf``) or the ``.gguf`` file (``gguf``)."""

    kind: Literal["hf", "gguf"]
    path: Path

    @property
    def default_name(self) -> str:
        return self.path.stem if self.kind == "gguf" else self.path.name


def inspect_model_path(path: Path) -> ModelSource:
    """Classify and check ``path``; raise ``ModelFileError`` naming the problem."""
    path = path.expanduser()
    if not path.exists():
        raise ModelFileError(f"model path does not exist: {path}")
    if path.is_file():
        return _inspect_file(path.resolve())
    if not path.is_dir():
        raise ModelFileError(f"model path is neither a file nor a directory: {path}")
    return _inspect_dir(path.resolve())


def _inspect_file(path: Path) -> ModelSource:
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        check_gguf(path)
        return ModelSource("gguf", path)
    if suffix in PICKLE_SUFFIXES:
        raise ModelFileError(
            f"{path.name} holds pickle weights, which rbees never loads (unpickling runs code); "
            "use a safetensors or GGUF copy of this model"
        )
    raise ModelFileError(
        f"unsupported model file {path.name}: give a Hugging Face model directory or a .gguf file"
    )


def _inspect_dir(path: Path) -> ModelSource:
    config = path / "config.json"
    if not config.exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            check_gguf(ggufs[0])
            return ModelSource("gguf", ggufs[0])
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise ModelFileError(f"{path} holds several GGUF files ({names}); pass the one to serve")
        raise ModelFileError(f"{path} is not a model directory: no config.json and no .gguf file")
    _refuse_remote_code(config)
    _refuse_remote_code(path / "tokenizer_config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ModelFileError(
                f"{path} has only pickle weights ({', '.join(pickles)}), which rbees never loads "
                "(unpickling runs code); use the safetensors version of this model"
            )
        raise ModelFileError(f"{path} has no *.safetensors weight files")
    _check_shard_index(path)
    for file in weights:
        check_safetensors(file)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelFileError(f"{path} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json)")
    return ModelSource("hf", path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path.name} is not valid JSON: {exc}") from exc


def _refuse_remote_code(path: Path) -> None:
    if not path.exists():
        return
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ModelFileError(f"{path.name} is not a JSON object")
    if "auto_map" in data:
        raise ModelFileError(
            f"{path.name} names custom code (auto_map), which would need trust_remote_code; "
            "rbees never runs code shipped with a model"
        )


def _check_shard_index(path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ModelFileError(f"{index.name} has no weight_map")
    missing = sorted({str(f) for f in weight_map.values()} - {p.name for p in path.glob("*.safetensors")})
    if missing:
        raise ModelFileError(f"{path} is incomplete: missing weight shards {', '.join(missing)}")


def check_safetensors(path: Path) -> None:
    """Parse the header and check that every tensor's bytes are present in the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path.name} is truncated or corrupt: {size} bytes, no safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ModelFileError(
                f"{path.name} is truncated or corrupt: header length {header_len} is impossible"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path.name} is corrupt: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name} is corrupt: the safetensors header is not an object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = max(end, _tensor_end(path, name, info))
    need = 8 + header_len + end
    if size < need:
        raise ModelFileError(f"{path.name} is truncated: {size} bytes on disk, its tensors need {need}")


def _tensor_end(path: Path, name: str, info: object) -> int:
    try:
        entry = info if isinstance(info, dict) else {}
        begin, end = (int(x) for x in entry["data_offsets"])
        shape = [int(d) for d in entry["shape"]]
        dtype = str(entry["dtype"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path.name} is corrupt: bad entry for tensor {name!r}") from exc
    width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
    if begin < 0 or end < begin or (width is not None and end - begin != math.prod(shape) * width):
        raise ModelFileError(f"{path.name} is corrupt: tensor {name!r} has inconsistent offsets")
    return end


# --- GGUF -------------------------------------------------------------------------------------

_GGUF_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_DEFAULT_ALIGNMENT = 32


class _Reader:
    """Bounds-checked little-endian reads over a memory-mapped file."""

    def __init__(self, buf: mmap.mmap, name: str) -> None:
        self.buf, self.pos, self.name = buf, 0, name

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.name} is truncated: the GGUF header ends early")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ModelFileError(
                f"{self.name} is truncated or corrupt: a string runs past the end of the file"
            )
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _GGUF_SCALAR:
            return self.unpack(_GGUF_SCALAR[vtype])
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _GGUF_SCALAR:
                width = struct.calcsize(_GGUF_SCALAR[item_type])
                if self.pos + count * width > len(self.buf):
                    raise ModelFileError(f"{self.name} is truncated: an array runs past the end of the file")
                self.pos += count * width
            else:
                for _ in range(count):
                    self.value(item_type)
            return None
        raise ModelFileError(f"{self.name} is corrupt: unknown GGUF value type {vtype}")


def check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table and check that all tensor data is in the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    if size < 24:
        raise ModelFileError(f"{path.name} is truncated or corrupt: only {size} bytes")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ModelFileError(f"{path.name} is not a GGUF file (bad magic bytes)")
        r = _Reader(buf, path.name)
        r.pos = 4
        version, n_tensors, n_kv = r.unpack("<I"), r.unpack("<Q"), r.unpack("<Q")
        if version not in (2, 3) or n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ModelFileError(f"{path.name} is corrupt or an unsupported GGUF version ({version})")
        alignment = _GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key, vtype = r.string(), r.unpack("<I")
            value = r.value(vtype)
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        data_end = 0
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("<I")
            if n_dims > 8:
                raise ModelFileError(f"{path.name} is corrupt: tensor {name!r} has {n_dims} dimensions")
            dims = [r.unpack("<Q") for _ in range(n_dims)]
            ttype, offset = r.unpack("<I"), r.unpack("<Q")
            try:
                block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError) as exc:
                raise ModelFileError(f"{path.name}: tensor {name!r} has unknown type {ttype}") from exc
            data_end = max(data_end, offset + math.prod(dims) // block * type_bytes)
        data_start = -(-r.pos // alignment) * alignment
    need = data_start + data_end
    if size < need:
        raise ModelFileError(f"{path.name} is truncated: {size} bytes on disk, its tensors need {need}")
