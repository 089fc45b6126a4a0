"""Worker settings: flags and environment merged once, with the defaults the contract names."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbees.worker.settings import settings_from_args

BASE = ["--worker-id", "w1", "--model", "/models/m", "--port", "8001"]


def test_defaults_and_environment() -> None:
    env = {"RBEES_WORKER_TOKEN": "tok", "RBEES_CALLBACK_TOKEN": "cb", "RBEES_HOME": "/srv/rbees"}
    s = settings_from_args(BASE, env)
    assert (s.host, s.slots, s.backend.value, s.drain_timeout_s) == ("127.0.0.1", 1, "cpu", 10.0)
    assert (s.token, s.callback_token) == ("tok", "cb")
    assert s.cache_dir == Path("/srv/rbees/cache")
    assert s.uri == "http://127.0.0.1:8001" and s.binds_loopback
    assert s.decode_nice == 5
    assert settings_from_args([*BASE, "--decode-nice", "0"], {}).decode_nice == 0
    assert s.prefill_batch_tokens == 4096
    assert settings_from_args([*BASE, "--prefill-batch-tokens", "0"], {}).prefill_batch_tokens == 0


def test_running_jobs_wait_for_a_refill_on_a_gpu_by_default_and_never_on_a_cpu() -> None:
    assert settings_from_args(BASE, {}).refill_share == 0.0
    assert settings_from_args([*BASE, "--backend", "cuda"], {}).refill_share == 0.125
    assert settings_from_args([*BASE, "--backend", "metal"], {}).refill_share == 0.125
    assert settings_from_args([*BASE, "--refill-wait", "0.2"], {}).refill_share == 0.2
    assert settings_from_args([*BASE, "--backend", "cuda", "--refill-wait", "0"], {}).refill_share == 0


def test_bursts_are_gathered_on_a_gpu_by_default_and_never_on_a_cpu() -> None:
    assert settings_from_args(BASE, {}).gather_share == 0.0
    assert settings_from_args([*BASE, "--backend", "cuda"], {}).gather_share == 0.5
    assert settings_from_args([*BASE, "--backend", "metal"], {}).gather_share == 0.5
    assert settings_from_args([*BASE, "--prefill-gather", "0.2"], {}).gather_share == 0.2
    assert settings_from_args([*BASE, "--backend", "cuda", "--prefill-gather", "0"], {}).gather_share == 0


def test_flags_win_over_environment_and_no_cache() -> None:
    s = settings_from_args([*BASE, "--token", "flag", "--no-cache"], {"RBEES_WORKER_TOKEN": "env"})
    assert s.token == "flag" and s.cache_dir is None


def test_callback_urls_repeat_and_advertise_url_is_the_uri() -> None:
    args = [*BASE, "--callback-url", "http://a:1/x", "--callback-url", "http://b:2/y"]
    s = settings_from_args([*args, "--advertise-url", "http://box.lan:8001/", "--host", "0.0.0.0"], {})
    assert s.callback_urls == ("http://a:1/x", "http://b:2/y")
    assert s.uri == "http://box.lan:8001" and not s.binds_loopback


@pytest.mark.parametrize(
    "extra",
    [
        ["--slots", "0"],
        ["--worker-id", "bad id"],
        ["--callback-url", "ftp://x"],
        ["--port", "70000"],
        ["--decode-nice", "-1"],
        ["--decode-nice", "20"],
        ["--prefill-batch-tokens", "-1"],
        ["--refill-wait", "-0.1"],
        ["--refill-wait", "2"],
        ["--prefill-gather", "-0.1"],
        ["--prefill-gather", "2"],
    ],
)
def test_invalid_values_are_refused(extra: list[str]) -> None:
    with pytest.raises(ValueError):
        settings_from_args([*BASE, *extra], {})
