"""Hub downloads through huggingface_hub against a local server speaking the hub's API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.pool.helpers import rbees_pool
from tests.pool.hubserver import COMMIT, FakeHub
from tests.support.procs import bin_path

TOKEN = "hf_test_Secret_0123456789"
BIG = "model-extra.safetensors"
BIG_BYTES = os.urandom(21 * 2**20)  # over huggingface_hub's 10 MiB write chunks, so a cut leaves a part


@pytest.fixture
def hub(tiny_llama: Path) -> Iterator[FakeHub]:
    with FakeHub(token=TOKEN) as hub:
        hub.add_dir("org/tiny", tiny_llama)
        hub.add_repo("org/big", {"config.json": b"{}", BIG: BIG_BYTES, "pytorch_model.bin": b"pickle"})
        hub.add_repo("org/tiny-GGUF", {"README.md": b"hi", "tiny.Q4_0.gguf": b"GGUF" + os.urandom(4096)})
        hub.add_repo("org/pickled", {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
        yield hub


def hub_env(hub: FakeHub, token: str | None = TOKEN) -> dict[str, str]:
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    return env | ({"HF_TOKEN": token} if token else {})


def register(model_id: str, repo: str, *extra: str) -> None:
    rbees_pool(
        "models",
        "register",
        "--id",
        model_id,
        "--name",
        model_id,
        "--repo",
        repo,
        "--architecture",
        "llama",
        *extra,
        check=True,
    )


def entry(model_id: str) -> dict[str, object]:
    entries = json.loads(rbees_pool("models", "catalog", "--json", check=True).stdout)
    return next(e for e in entries if e["id"] == model_id)  # type: ignore[no-any-return]


def test_download_fetches_weights_config_and_tokenizer_with_the_token(
    hub: FakeHub, pool_home: Path, tiny_llama: Path
) -> None:
    register("tiny", "org/tiny")
    done = rbees_pool("models", "download", "tiny", env=hub_env(hub))
    assert done.returncode == 0, done.stderr
    model = pool_home / "models" / "tiny"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model / name).read_bytes() == (tiny_llama / name).read_bytes()
    assert not (model / ".rbees-download").exists()
    e = entry("tiny")
    assert e["downloaded"] is True
    assert e["commit"] == COMMIT
    size = sum(p.stat().st_size for p in model.iterdir())
    assert e["size_bytes"] == size
    assert e["size_gb"] == round(size / 1e9, 2)
    hub_requests = [r for r in hub.log if r.path.startswith(("/api/models", "/org/"))]
    assert hub_requests
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub_requests)
    assert TOKEN not in done.stdout + done.stderr


def test_pickled_weights_are_never_fetched(hub: FakeHub, pool_home: Path) -> None:
    register("big", "org/big")
    rbees_pool("models", "download", "big", env=hub_env(hub), check=True)
    assert (pool_home / "models" / "big" / BIG).read_bytes() == BIG_BYTES
    assert not (pool_home / "models" / "big" / "pytorch_model.bin").exists()
    assert hub.gets("pytorch_model.bin") == []


def test_a_repo_with_only_pickled_weights_is_refused(hub: FakeHub) -> None:
    register("pickled", "org/pickled")
    done = rbees_pool("models", "download", "pickled", env=hub_env(hub))
    assert done.returncode == 6
    assert "no top-level .safetensors weights" in done.stderr
    assert entry("pickled")["downloaded"] is False


def test_one_gguf_file(hub: FakeHub, pool_home: Path) -> None:
    register("tg", "org/tiny-GGUF", "--file", "tiny.Q4_0.gguf")
    rbees_pool("models", "download", "tg", env=hub_env(hub), check=True)
    e = entry("tg")
    assert e["downloaded"] is True
    assert (pool_home / str(e["path"])).read_bytes()[:4] == b"GGUF"
    assert not (pool_home / "models" / "tg" / "README.md").exists()


def test_a_dropped_connection_resumes_with_a_range_request(hub: FakeHub, pool_home: Path) -> None:
    register("big", "org/big")
    hub.drop_after[BIG] = 15 * 2**20
    done = rbees_pool("models", "download", "big", env=hub_env(hub))
    assert done.returncode == 0, done.stderr
    assert (pool_home / "models" / "big" / BIG).read_bytes() == BIG_BYTES
    ranges = [r.range for r in hub.gets(BIG)]
    assert ranges[0] is None
    assert ranges[1] == f"bytes={10 * 2**20}-"  # the 10 MiB written before the cut were kept
    assert entry("big")["downloaded"] is True


def test_an_interrupted_download_is_not_marked_and_resumes_next_time(hub: FakeHub, pool_home: Path) -> None:
    register("big", "org/big")
    hub.stall_after[BIG] = 15 * 2**20
    proc = subprocess.Popen(
        [bin_path("rbees-pool"), "models", "download", "big"],
        env={**os.environ, **hub_env(hub)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert hub.stalled.wait(60), "the download never reached the big file"
        part = pool_home / "models" / "big" / ".rbees-download" / "parts" / f"{BIG}.part"
        _wait_for(lambda: part.is_file() and part.stat().st_size == 10 * 2**20)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    hub.release.set()
    assert proc.returncode == 130
    assert "interrupted" in err
    assert entry("big")["downloaded"] is False
    assert (pool_home / "models" / "big" / "config.json").is_file()  # finished files stay

    done = rbees_pool("models", "download", "big", env=hub_env(hub))
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    assert (pool_home / "models" / "big" / BIG).read_bytes() == BIG_BYTES
    assert [r.range for r in hub.gets(BIG)] == [None, f"bytes={10 * 2**20}-"]
    assert len(hub.gets("config.json")) == 1  # not fetched again
    assert entry("big")["downloaded"] is True


def test_a_killed_download_resumes_too(hub: FakeHub, pool_home: Path) -> None:
    register("big", "org/big")
    hub.stall_after[BIG] = 15 * 2**20
    proc = subprocess.Popen(
        [bin_path("rbees-pool"), "models", "download", "big"],
        env={**os.environ, **hub_env(hub)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert hub.stalled.wait(60)
        part = pool_home / "models" / "big" / ".rbees-download" / "parts" / f"{BIG}.part"
        _wait_for(lambda: part.is_file() and part.stat().st_size == 10 * 2**20)
    finally:
        proc.kill()
        proc.wait()
    hub.release.set()
    assert entry("big")["downloaded"] is False
    rbees_pool("models", "download", "big", env=hub_env(hub), check=True)
    assert (pool_home / "models" / "big" / BIG).read_bytes() == BIG_BYTES
    assert hub.gets(BIG)[-1].range == f"bytes={10 * 2**20}-"


def test_unknown_repo_is_a_clear_error(hub: FakeHub) -> None:
    register("ghost", "org/ghost")
    done = rbees_pool("models", "download", "ghost", env=hub_env(hub))
    assert done.returncode == 6
    assert "repository org/ghost not found on the hub" in done.stderr
    assert entry("ghost")["downloaded"] is False


def test_a_wrong_token_is_refused_and_never_printed(hub: FakeHub) -> None:
    register("tiny", "org/tiny")
    done = rbees_pool("models", "download", "tiny", env=hub_env(hub, token="hf_wrong_Token_987654"))
    assert done.returncode == 6
    assert "hf_wrong_Token_987654" not in done.stdout + done.stderr
    assert entry("tiny")["downloaded"] is False


def test_offline_hub_is_a_clear_error(hub: FakeHub) -> None:
    register("tiny", "org/tiny")
    done = rbees_pool("models", "download", "tiny", env=hub_env(hub) | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 6
    assert "HF_HUB_OFFLINE" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_unreachable_hub_is_a_clear_error() -> None:
    register("tiny", "org/tiny")
    with FakeHub() as gone:
        url = gone.url
    done = rbees_pool("models", "download", "tiny", env={"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0"})
    assert done.returncode == 6
    assert done.stderr.startswith("error: download of tiny failed")
    assert entry("tiny")["downloaded"] is False


def _wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
