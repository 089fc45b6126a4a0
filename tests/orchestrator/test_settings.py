"""Settings: TOML file, then RBEES_ORCD_* env, then flags; a wide bind needs a token."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from rbees.orchestrator.main import load_settings
from rbees.orchestrator.settings import Policy
from tests.support.procs import bin_path


def test_file_env_flags_merge_in_that_order(tmp_path: Path) -> None:
    cfg = tmp_path / "orcd.toml"
    cfg.write_text('[orchestrator]\nport = 9000\nqueue_size = 5\npolicy = "round-robin"\nmax-retries = 4\n')
    env = {"RBEES_ORCD_QUEUE_SIZE": "7", "RBEES_ORCD_SILENCE_TIMEOUT_S": "3.5"}
    s = load_settings(["--config", str(cfg), "--queue-size", "9", "--state-dir", str(tmp_path)], env)
    assert s.port == 9000  # file
    assert s.policy is Policy.ROUND_ROBIN  # file
    assert s.max_retries == 4  # file, dashed key
    assert s.silence_timeout_s == 3.5  # env
    assert s.queue_size == 9  # flag beats env beats file
    assert s.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("argv", "env", "channels"),
    [
        ([], {}, True),
        (["--worker-channels", "false"], {}, False),
        ([], {"RBEES_ORCD_WORKER_CHANNELS": "0"}, False),
        (["--worker-channels", "true"], {"RBEES_ORCD_WORKER_CHANNELS": "false"}, True),
    ],
)
def test_worker_channels_are_on_unless_turned_off(
    tmp_path: Path, argv: list[str], env: dict[str, str], channels: bool
) -> None:
    assert load_settings(["--state-dir", str(tmp_path), *argv], env).worker_channels is channels
    with pytest.raises(ValidationError):
        load_settings(["--state-dir", str(tmp_path), "--worker-channels", "sometimes"], {})


def test_config_path_from_env(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 9100\n")
    assert load_settings([], {"RBEES_ORCD_CONFIG": str(cfg)}).port == 9100


def test_wide_bind_without_token_is_refused() -> None:
    with pytest.raises(ValidationError, match="API token"):
        load_settings(["--host", "0.0.0.0"], {})
    assert load_settings(["--host", "0.0.0.0", "--api-token", "t"], {}).api_token == "t"
    assert load_settings(["--host", "::1"], {}).host == "::1"


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("portt = 1\n")
    with pytest.raises(ValidationError):
        load_settings(["--config", str(cfg)], {})


def test_cli_refuses_wide_bind_with_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [bin_path("rbees-orcd"), "--host", "0.0.0.0", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "API token" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--log-level", "bogus"], "log_level"),
        (["--api-token", "two words"], "printable ASCII"),
        (["--state-dir", "FILE"], "state dir"),  # a file where the directory should be
        (["--state-dir", "/proc/no/such"], "state dir"),
    ],
)
def test_cli_refuses_bad_settings_in_one_line_with_exit_2(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = [str(blocker) if a == "FILE" else a for a in args]
    if "--state-dir" not in argv:
        argv += ["--state-dir", str(tmp_path / "state")]
    proc = subprocess.run([bin_path("rbees-orcd"), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("rbees-orcd: error:") and needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "serving" not in proc.stderr


def test_the_log_level_takes_any_case(tmp_path: Path) -> None:
    assert load_settings(["--log-level", "WARNING", "--state-dir", str(tmp_path)], {}).log_level == "warning"


def test_a_config_file_is_named_in_its_errors_and_keys_beside_the_table_are_refused(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.toml"
    mixed.write_text("port = 9999\n[orchestrator]\nqueue_size = 5\n")
    with pytest.raises(
        ValueError, match=r"mixed\.toml: keys outside \[orchestrator\] would be ignored \(port\)"
    ):
        load_settings(["--config", str(mixed)], {})
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(ValueError, match=r"broken\.toml is not valid TOML"):
        load_settings(["--config", str(broken)], {})


def test_an_empty_token_means_none(tmp_path: Path) -> None:
    env = {"RBEES_ORCD_API_TOKEN": "", "RBEES_ORCD_REGISTRATION_TOKEN": ""}
    s = load_settings(["--state-dir", str(tmp_path)], env)
    assert s.api_token is None and s.registration_token is None
