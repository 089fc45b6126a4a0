"""`rbees infer` and `rbees jobs` against a real cluster: data on stdout, diagnostics on stderr."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from rbees.ctl.cli import app
from tests.sdk.cluster import Cluster, run_cluster
from tests.support.procs import free_port


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with run_cluster(tmp_path_factory.mktemp("cli-cluster"), tiny_llama) as running:
        yield running


def rbees(cluster: Cluster, *args: str, token: bool = True) -> Result:
    env = {"RBEES_ORCHESTRATOR": cluster.url, "RBEES_API_TOKEN": cluster.api_token if token else ""}
    return CliRunner().invoke(app, list(args), env=env)


def test_infer_streams_tokens_to_stdout_and_a_summary_to_stderr(cluster: Cluster) -> None:
    first = rbees(cluster, "infer", "--model", "tiny", "--prompt", "Hello", "-n", "12", "--seed", "5")
    again = rbees(cluster, "infer", "--prompt", "Hello", "-n", "12", "--seed", "5")  # the only model

    assert first.exit_code == 0, first.stderr
    assert first.stdout.strip() and first.stdout == again.stdout
    assert ("tok/s" in first.stderr and "stop MAX_TOKENS" in first.stderr) or "stop EOS" in first.stderr
    assert "seed 5" in first.stderr and "tok/s" not in first.stdout


def test_infer_json_prints_every_event_with_its_id(cluster: Cluster) -> None:
    result = rbees(cluster, "infer", "--prompt", "Hello", "-n", "4", "--json", "--chat")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 0
    assert lines[0]["type"] == "queued" and lines[0]["id"] == "1"
    assert lines[-1]["type"] == "end" and [line["id"] for line in lines] == [
        str(i + 1) for i in range(len(lines))
    ]


def test_infer_direct_to_a_worker(cluster: Cluster) -> None:
    address = cluster.worker_url.removeprefix("http://")
    ok = rbees(
        cluster,
        "infer",
        "--worker",
        address,
        "--token",
        cluster.worker_token,
        "-p",
        "Hi",
        "-n",
        "6",
        "-t",
        "0",
    )
    denied = rbees(cluster, "infer", "--worker", address, "-p", "Hi", "-n", "6")
    for flags in (["-m", "tiny"], ["--priority", "batch"]):  # nothing a worker would use
        ignored = rbees(cluster, "infer", "--worker", address, "-p", "Hi", *flags)
        assert ignored.exit_code == 2 and "are for the orchestrator" in ignored.stderr

    assert ok.exit_code == 0 and ok.stdout.strip() and "tok/s" in ok.stderr
    assert denied.exit_code == 1 and "UNAUTHORIZED" in denied.stderr and denied.stdout == ""


def test_infer_failures_have_messages_and_exit_codes(cluster: Cluster) -> None:
    missing = rbees(cluster, "infer", "--model", "nope", "--prompt", "Hi")
    invalid = rbees(cluster, "infer", "--prompt", "Hi", "--temperature", "9")
    no_token = rbees(cluster, "infer", "--prompt", "Hi", "--model", "tiny", token=False)
    nowhere = rbees(cluster, "infer", "--prompt", "Hi", "-o", f"http://127.0.0.1:{free_port()}")

    assert missing.exit_code == 4 and "MODEL_NOT_FOUND" in missing.stderr and missing.stdout == ""
    assert invalid.exit_code == 2 and "temperature" in invalid.stderr
    assert no_token.exit_code == 1 and "UNAUTHORIZED" in no_token.stderr
    assert nowhere.exit_code == 3 and "cannot reach" in nowhere.stderr
    no_scheme = rbees(cluster, "infer", "--prompt", "Hi", "-o", f"127.0.0.1:{free_port()}")  # http:// implied
    assert no_scheme.exit_code == 3 and "cannot reach" in no_scheme.stderr
    for flags in (["-o", "http://127.0.0.1:abc"], ["-o", "ftp://x"], ["--worker", "bad host:xx"]):
        bad_url = rbees(cluster, "infer", "--prompt", "Hi", *flags)
        assert bad_url.exit_code == 2 and "URL" in bad_url.stderr and "expected http(s)://" in bad_url.stderr


def test_infer_finds_the_only_model_without_a_token_to_list_workers(tiny_llama: Path, tmp_path: Path) -> None:
    # Clients need no token here; listing workers needs the registration token, which a client lacks.
    with run_cluster(tmp_path, tiny_llama, registration_token="worker-secret") as open_cluster:
        env = {"RBEES_ORCHESTRATOR": open_cluster.url, "RBEES_API_TOKEN": ""}
        done = CliRunner().invoke(app, ["infer", "-p", "Hello", "-n", "3"], env=env)
    assert done.exit_code == 0, done.stderr
    assert done.stdout.strip()


def test_jobs_submit_status_follow_list(cluster: Cluster) -> None:
    submitted = rbees(cluster, "jobs", "submit", "--prompt", "Once upon a time", "-n", "8", "--seed", "1")
    job_id = submitted.stdout.strip()
    assert submitted.exit_code == 0 and job_id.startswith("job-")

    followed = rbees(cluster, "jobs", "follow", job_id)
    assert followed.exit_code == 0 and followed.stdout.strip() and job_id in followed.stderr

    resumed = rbees(cluster, "jobs", "follow", job_id, "--last-event-id", "2", "--json")
    ids = [json.loads(line)["id"] for line in resumed.stdout.splitlines()]
    assert ids[0] == "3"
    past = rbees(cluster, "jobs", "follow", job_id, "--last-event-id", "999")
    assert past.exit_code == 2 and "past the last event" in past.stderr, past.stderr

    status = json.loads(rbees(cluster, "jobs", "status", job_id, "--json").stdout)
    assert status["status"] == "completed" and status["tokens_out"] <= 8

    listed = json.loads(rbees(cluster, "jobs", "list", "--json").stdout)
    assert job_id in [j["job_id"] for j in listed]
    table = rbees(cluster, "jobs", "list", "--status", "completed")
    assert job_id in table.stdout and "completed" in table.stdout
    bogus = rbees(cluster, "jobs", "list", "--status", "bogus")
    assert bogus.exit_code == 2 and "status" in bogus.stderr
    done_already = rbees(cluster, "jobs", "cancel", job_id)
    assert done_already.exit_code == 0 and "already completed; nothing to cancel" in done_already.stderr


def test_jobs_cancel(cluster: Cluster) -> None:
    busy = rbees(cluster, "jobs", "submit", "--prompt", "1 2 3", "-n", "200", "-t", "0")
    queued = rbees(
        cluster, "jobs", "submit", "--prompt", "1 2 3", "-n", "200", "-t", "0", "--priority", "batch"
    )
    job_id = queued.stdout.strip()

    cancelled = rbees(cluster, "jobs", "cancel", job_id)
    followed = rbees(cluster, "jobs", "follow", job_id)
    rbees(cluster, "jobs", "cancel", busy.stdout.strip())

    assert cancelled.exit_code == 0 and job_id in cancelled.stderr
    assert followed.exit_code == 1 and "stop CANCELLED" in followed.stderr
    missing = rbees(cluster, "jobs", "status", "job-nope")
    assert missing.exit_code == 4 and "JOB_NOT_FOUND" in missing.stderr
