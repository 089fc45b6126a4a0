"""The model catalog through the real CLI: register, catalog, list, unregister; safe ids; concurrency."""

from __future__ import annotations

import json
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rbees.pool.catalog import validate_id
from rbees.pool.errors import InvalidInput
from tests.pool.helpers import rbees_pool

QWEN = [
    "--id",
    "qwen-0.5b",
    "--name",
    "Qwen2.5 0.5B Instruct",
    "--repo",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "--architecture",
    "qwen",
]


def catalog_json() -> list[dict[str, object]]:
    done = rbees_pool("models", "catalog", "--json", check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_fresh_pool_knows_the_embedded_default_model(pool_home: Path) -> None:
    entries = catalog_json()
    assert [e["id"] for e in entries] == ["smollm2-135m"]
    assert entries[0]["downloaded"] is False
    assert entries[0]["format"] == "gguf"
    assert not pool_home.exists() or not (pool_home / "catalog.json").exists()  # reading writes nothing


def test_register_then_catalog_shows_the_spec_table(pool_home: Path) -> None:
    done = rbees_pool("models", "register", *QWEN)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # diagnostics only, on stderr
    assert "qwen-0.5b" in done.stderr

    table = rbees_pool("models", "catalog", check=True).stdout
    assert "Model Catalog for" in table
    for column in ("ID", "Name", "Downloaded", "Size"):
        assert column in table
    row = next(line for line in table.splitlines() if line.startswith("qwen-0.5b"))
    assert "Qwen2.5 0.5B Instruct" in row
    assert "❌" in row
    assert "0.0 GB" in row
    assert "Total models: 2" in table

    entry = next(e for e in catalog_json() if e["id"] == "qwen-0.5b")
    assert entry == entry | {
        "name": "Qwen2.5 0.5B Instruct",
        "repo": "Qwen/Qwen2.5-0.5B-Instruct",
        "architecture": "qwen",
        "format": "hf",
        "path": "models/qwen-0.5b",
        "downloaded": False,
        "size_gb": 0.0,
    }
    on_disk = json.loads((pool_home / "catalog.json").read_text())
    assert {m["id"] for m in on_disk["models"]} == {"smollm2-135m", "qwen-0.5b"}


def test_register_gguf_file_and_revision() -> None:
    rbees_pool(
        "models",
        "register",
        "--id",
        "tiny-gguf",
        "--name",
        "T",
        "--repo",
        "org/tiny-GGUF",
        "--architecture",
        "llama",
        "--file",
        "tiny.Q4_0.gguf",
        "--revision",
        "v1.0",
        check=True,
    )
    entry = next(e for e in catalog_json() if e["id"] == "tiny-gguf")
    assert entry["format"] == "gguf"
    assert entry["file"] == "tiny.Q4_0.gguf"
    assert entry["revision"] == "v1.0"
    assert entry["path"] == "models/tiny-gguf/tiny.Q4_0.gguf"


def test_a_known_id_with_other_details_is_refused_and_the_same_registration_again_is_fine() -> None:
    rbees_pool("models", "register", *QWEN, check=True)
    first = next(e for e in catalog_json() if e["id"] == "qwen-0.5b")
    again = rbees_pool("models", "register", *QWEN[:3], "Other", *QWEN[4:])
    assert again.returncode == 4
    assert again.stderr.strip() == (
        "error: model 'qwen-0.5b' is already in the catalog with other details "
        "(name 'Qwen2.5 0.5B Instruct', not 'Other'); unregister it first to change them"
    )
    assert next(e for e in catalog_json() if e["id"] == "qwen-0.5b") == first
    same = rbees_pool("models", "register", *QWEN, "--json")  # a setup script run twice
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["registered_at"] == first["registered_at"]
    assert [e["id"] for e in catalog_json()].count("qwen-0.5b") == 1


@pytest.mark.parametrize("bad", ["../x", "/abs", "a b", "x" * 200, "", ".hidden", "Caps", "a/b", "..", "-x"])
def test_unsafe_ids_are_refused_with_a_clear_message(pool_home: Path, bad: str) -> None:
    done = rbees_pool("models", "register", "--id", bad, *QWEN[2:])
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: invalid model id")
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""
    assert not (pool_home / "catalog.json").exists()
    assert not list(pool_home.glob("**/x*"))


def test_nul_in_an_id_is_refused() -> None:
    # argv cannot carry a NUL byte, so this one goes through the same validator directly
    with pytest.raises(InvalidInput):
        validate_id("a\x00b")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--repo", "not a repo"),
        ("--repo", "../../etc"),
        ("--architecture", "Llama 3"),
        ("--file", "../escape.gguf"),
        ("--file", "/abs.gguf"),
        ("--file", "weights.bin"),
        ("--revision", "a b"),
    ],
)
def test_bad_fields_are_refused(flag: str, value: str) -> None:
    args = dict(zip(QWEN[::2], QWEN[1::2], strict=True)) | {flag: value}
    done = rbees_pool("models", "register", *[x for kv in args.items() for x in kv])
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: invalid {flag}")


@pytest.mark.parametrize("command", [["models", "download", "nope"], ["models", "unregister", "nope"]])
def test_unknown_ids_exit_3(command: list[str]) -> None:
    done = rbees_pool(*command)
    assert done.returncode == 3
    assert done.stderr.strip() == "error: unknown model 'nope' (see `rbees-pool models catalog`)"


def test_unregister_keeps_files_and_says_so(pool_home: Path, tiny_llama: Path) -> None:
    rbees_pool(
        "models",
        "register",
        "--id",
        "tiny",
        "--name",
        "Tiny",
        "--repo",
        "local/tiny",
        "--architecture",
        "llama",
        check=True,
    )
    rbees_pool("models", "download", "tiny", "--from", str(tiny_llama), check=True)
    done = rbees_pool("models", "unregister", "tiny", check=True)
    assert "files are kept" in done.stderr
    assert (pool_home / "models" / "tiny" / "config.json").is_file()
    assert "tiny" not in [e["id"] for e in catalog_json()]


def test_list_shows_downloaded_models_only(tiny_llama: Path) -> None:
    rbees_pool("models", "register", *QWEN, check=True)
    rbees_pool(
        "models",
        "register",
        "--id",
        "tiny",
        "--name",
        "Tiny",
        "--repo",
        "local/tiny",
        "--architecture",
        "llama",
        check=True,
    )
    assert json.loads(rbees_pool("models", "list", "--json", check=True).stdout) == []
    rbees_pool("models", "download", "tiny", "--from", str(tiny_llama), check=True)
    listed = json.loads(rbees_pool("models", "list", "--json", check=True).stdout)
    assert [e["id"] for e in listed] == ["tiny"]
    assert listed[0]["downloaded"] is True
    assert listed[0]["size_bytes"] > 0
    table = rbees_pool("models", "list", check=True).stdout
    assert "tiny" in table
    assert "qwen-0.5b" not in table


def test_twenty_concurrent_registers_lose_nothing_and_never_tear_the_file(pool_home: Path) -> None:
    rbees_pool("models", "register", *QWEN, check=True)
    catalog = pool_home / "catalog.json"
    stop = threading.Event()
    torn: list[str] = []

    def read_continuously() -> None:
        while not stop.is_set():
            try:
                json.loads(catalog.read_text())
            except ValueError as exc:
                torn.append(str(exc))

    reader = threading.Thread(target=read_continuously)
    reader.start()

    def register(i: int) -> subprocess.CompletedProcess[str]:
        return rbees_pool(
            "models",
            "register",
            "--id",
            f"m-{i:02d}",
            "--name",
            f"Model {i}",
            "--repo",
            f"org/m-{i}",
            "--architecture",
            "llama",
            timeout=180,
        )

    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(register, range(20)))
    finally:
        stop.set()
        reader.join()
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results if r.returncode]
    assert torn == []
    ids = {e["id"] for e in catalog_json()}
    assert ids == {"smollm2-135m", "qwen-0.5b"} | {f"m-{i:02d}" for i in range(20)}
    assert not list(pool_home.glob(".catalog.json.*"))  # no temporary file left


@pytest.mark.parametrize(
    ("n_bytes", "shown"),
    [
        (0, "0.0 GB"),
        (-1, "0.0 GB"),
        (2_200_000_000, "2.2 GB"),
        (948_000_000, "0.9 GB"),
        (50_000_000, "0.1 GB"),
        (49_999_999, "50 MB"),
        (123_456, "123 kB"),
    ],
)
def test_catalog_sizes_read_as_the_spec_shows_them(n_bytes: int, shown: str) -> None:
    from rbees.pool.render import catalog_size

    assert catalog_size(n_bytes) == shown


def test_an_unusable_home_or_workerd_setting_is_one_line_and_exit_2(pool_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "locks").write_text("")  # a file where the home's locks directory goes
    cases = [
        ({"RBEES_HOME": "~no-such-user-here/x"}, "bad pool home"),
        ({"RBEES_HOME": str(home)}, "cannot set up the pool home"),
        ({"RBEES_WORKERD": '"x'}, "bad RBEES_WORKERD"),
    ]
    for env, needle in cases:
        done = rbees_pool("models", "register", *QWEN, env=env)
        assert done.returncode == 2, (env, done.stderr)
        assert done.stderr.startswith("error: ") and needle in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_a_bad_hf_endpoint_stops_a_download_only(pool_home: Path) -> None:
    env = {"HF_ENDPOINT": "notaurl"}
    rbees_pool("models", "register", *QWEN, env=env, check=True)  # other commands do not care
    done = rbees_pool("models", "download", "qwen-0.5b", env=env)
    assert done.returncode == 2 and "HF_ENDPOINT 'notaurl' is no http(s) URL" in done.stderr
