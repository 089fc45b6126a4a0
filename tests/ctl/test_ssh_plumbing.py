"""The pure parts of `rbees pool`: destinations, the ssh command line, quoting, failure lines, merging."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from rbees.ctl.fanout import line_prefixes
from rbees.ctl.inventory import (
    Inventory,
    InventoryError,
    PoolEntry,
    PoolSettings,
    parse_destination,
    resolve_target,
)
from rbees.ctl.remote_scripts import pool_command
from rbees.ctl.render import Listing, columns_for, merge_rows, rows_of
from rbees.ctl.ssh import (
    CONNECTED_MARKER,
    FailureKind,
    SshSettings,
    classify_failure,
    command_line,
    quote_remote_path,
    ssh_argv,
    usable_control_dir,
    wrap_remote,
)

NASTY = [
    "a b; rm -rf ~ $(id) 'x'",
    '"$HOME" `id` \\n',
    "*",
    "-rf",
    "",
    "ü 🐝\ttab",
    "line1\nline2",
    "~/not-home",
]


@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ("mac.home.arpa", (None, "mac.home.arpa", None)),
        ("vince@mac", ("vince", "mac", None)),
        ("vince@mac:2222", ("vince", "mac", 2222)),
        ("ssh://root@10.0.0.5:22", ("root", "10.0.0.5", 22)),
        ("[::1]:2200", (None, "::1", 2200)),
        ("fe80::1", (None, "fe80::1", None)),
        ("workstation-alias", (None, "workstation-alias", None)),
    ],
)
def test_destinations_parse(dest: str, expected: tuple[str | None, str, int | None]) -> None:
    assert parse_destination(dest) == expected


@pytest.mark.parametrize("dest", ["-oProxyCommand=touch x", "host:99999", "a b", "user@", "h;id", "us er@h"])
def test_destinations_that_could_inject_options_or_commands_are_refused(dest: str) -> None:
    with pytest.raises(InventoryError):
        parse_destination(dest)


def test_pool_names_win_over_destinations_and_defaults_fill_gaps() -> None:
    inv = Inventory(
        defaults=PoolSettings(user="ops", identity_file="~/.ssh/lab", env={"A": "1"}),
        pools={"mac": PoolEntry(host="mac.home.arpa", port=2222, install_dir="~/src/rbees", env={"B": "2"})},
    )
    mac = resolve_target("mac", inv)
    assert (mac.host, mac.port, mac.user) == ("mac.home.arpa", 2222, "ops")
    assert mac.rbees_pool == "~/src/rbees/.venv/bin/rbees-pool"
    assert mac.identity_file == str(Path("~/.ssh/lab").expanduser())
    assert dict(mac.env) == {"A": "1", "B": "2"}
    assert not mac.path_fallback
    plain = resolve_target("root@box:2200", inv)
    assert (plain.host, plain.port, plain.user) == ("box", 2200, "root")
    # nothing configured: the default install dir's rbees-pool where `pool dev setup` put one, else PATH's
    assert plain.rbees_pool == "~/rbees/.venv/bin/rbees-pool" and plain.path_fallback
    assert pool_command(plain, ["status"]) == (
        'if [ -x "$HOME"/rbees/.venv/bin/rbees-pool ]; then "$HOME"/rbees/.venv/bin/rbees-pool status; '
        "else rbees-pool status; fi"
    )


def test_ssh_command_line_is_strict_batch_and_shared() -> None:
    inv = Inventory(
        pools={"p": PoolEntry(host="h", port=2222, user="u", identity_file="/k", known_hosts_file="/kh")}
    )
    argv = ssh_argv(resolve_target("p", inv), "true", SshSettings(control_dir=Path("/tmp/cm")))
    text = " ".join(argv)
    for opt in ("BatchMode=yes", "StrictHostKeyChecking=yes", "ConnectTimeout=10", "ControlMaster=auto"):
        assert opt in text
    assert "ControlPath=/tmp/cm/%C" in text and "UserKnownHostsFile=/kh" in text
    assert "StrictHostKeyChecking=no" not in text and "accept-new" not in text
    assert argv[-3:] == ["--", "h", "true"]
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-i") + 1] == "/k"


def test_overlong_control_dir_turns_sharing_off() -> None:
    with tempfile.TemporaryDirectory(prefix="rbc-") as short:
        assert usable_control_dir(Path(short) / ("x" * 80)) is None
        assert usable_control_dir(Path(short) / "cm") == Path(short) / "cm"
        assert (Path(short) / "cm").stat().st_mode & 0o777 == 0o700


def test_every_argument_reaches_the_remote_shell_verbatim(tmp_path: Path) -> None:
    script = command_line("printf", ["%s\\0", *NASTY])
    canary = tmp_path / "canary"
    script_env = wrap_remote(script, {"CANARY": str(canary)})
    done = subprocess.run(
        ["sh", "-c", script_env],
        capture_output=True,
        cwd=tmp_path,
        env={"HOME": str(tmp_path / "h")},
        check=True,
    )
    assert done.stdout.decode().split("\0")[:-1] == NASTY
    assert done.stderr.decode().strip() == CONNECTED_MARKER
    assert list(tmp_path.iterdir()) == []


def test_a_leading_tilde_means_the_remote_home(tmp_path: Path) -> None:
    script = command_line("printf", ["%s", "~/x"]) + "; printf '|%s' " + quote_remote_path("~/my dir/p")
    out = subprocess.run(["sh", "-c", script], capture_output=True, env={"HOME": "/home/u"}, check=True)
    assert out.stdout.decode() == "~/x|/home/u/my dir/p"


@pytest.mark.parametrize(
    ("stderr", "kind", "needle"),
    [
        ("ssh: connect to host 127.0.0.1 port 2222: Connection refused", FailureKind.UNREACHABLE, "refused"),
        ("Connection timed out during banner exchange", FailureKind.UNREACHABLE, "timed out after 10s"),
        (
            "ssh: Could not resolve hostname nope: Name or service not known",
            FailureKind.UNREACHABLE,
            "unknown host",
        ),
        ("root@127.0.0.1: Permission denied (publickey,password).", FailureKind.AUTH, "ssh-add"),
        (
            "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\n"
            "Host key verification failed.",
            FailureKind.HOST_KEY_UNKNOWN,
            "ssh-keyscan -p 2222 127.0.0.1 >> ~/.ssh/known_hosts",
        ),
        (
            "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
            '  ssh-keygen -f "/kh" -R "[127.0.0.1]:2222"\nHost key verification failed.',
            FailureKind.HOST_KEY_CHANGED,
            "-R '[127.0.0.1]:2222'",
        ),
        ("kex_exchange_identification: weird", FailureKind.SSH, "weird"),
    ],
)
def test_connection_failures_become_one_clear_line(stderr: str, kind: FailureKind, needle: str) -> None:
    target = resolve_target("root@127.0.0.1:2222", Inventory())
    failure = classify_failure(
        target, 255, connected=False, ssh_stderr=stderr.splitlines(), remote_stderr=[], program="rbees-pool"
    )
    assert failure is not None and failure.kind is kind
    assert needle in failure.message and "\n" not in failure.message


def test_failures_after_connecting_keep_the_remote_exit_code() -> None:
    target = resolve_target("h", Inventory())
    missing = classify_failure(
        target,
        127,
        connected=True,
        ssh_stderr=[],
        remote_stderr=["sh: 1: rbees-pool: not found\n"],
        program="rbees-pool",
    )
    assert (
        missing is not None and missing.kind is FailureKind.COMMAND_MISSING and "dev setup" in missing.message
    )
    plain = classify_failure(
        target, 3, connected=True, ssh_stderr=[], remote_stderr=["error: nope\n"], program="x"
    )
    assert (
        plain is not None and plain.kind is FailureKind.EXIT and plain.message == "exit code 3: error: nope"
    )
    assert classify_failure(target, 0, connected=True, ssh_stderr=[], remote_stderr=[], program="x") is None


def test_listings_merge_with_a_host_column() -> None:
    rows = merge_rows([("a", [{"id": "m1", "host": "x"}]), ("b", {"models": [{"id": "m2"}]}), ("c", [])])
    assert rows == [{"host": "a", "id": "m1", "remote_host": "x"}, {"host": "b", "id": "m2"}]
    assert rows_of({"hostname": "vm", "gpus": []}) == [{"hostname": "vm", "gpus": []}]
    assert columns_for(Listing.CATALOG, rows) == ["host", "id"]


def test_prefixes_line_up() -> None:
    inv = Inventory()
    targets = [resolve_target(h, inv) for h in ("a", "longer-host")]
    assert line_prefixes(targets) == ["[a]           ", "[longer-host] "]
