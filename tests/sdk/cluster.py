"""A real local cluster for data-plane tests: ``rbees-orcd`` plus one ``rbees-workerd`` on a tiny model.

The orchestrator requires an API token, so every client test also proves the token is sent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import ManagedProcess, bin_path, free_port, get_json, wait_http

API_TOKEN = "test-api-token"
MODEL_ID = "tiny"


@dataclass(frozen=True)
class Cluster:
    url: str
    worker_url: str
    worker_id: str
    worker_token: str
    model: str
    api_token: str
    orcd: ManagedProcess
    worker: ManagedProcess


def wait_worker_ready(
    url: str, worker_id: str, timeout: float, procs: Sequence[ManagedProcess], token: str = API_TOKEN
) -> None:
    """Until the orchestrator lists ``worker_id`` healthy and schedulable."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited early:\n{proc.log_text()[-3000:]}")
        with contextlib.suppress(OSError, ValueError):
            listed = get_json(f"{url}/v2/workers", headers=headers)
            rows = listed if isinstance(listed, list) else listed.get("workers", [])
            if any(w["worker_id"] == worker_id and w.get("schedulable") for w in rows):
                return
        time.sleep(0.1)
    raise TimeoutError(f"worker {worker_id} not ready at {url} after {timeout}s")


@contextlib.contextmanager
def run_cluster(
    tmp: Path,
    model_path: Path,
    *,
    slots: int = 1,
    orcd_args: Sequence[str] = (),
    registration_token: str | None = None,
) -> Iterator[Cluster]:
    """An orchestrator (with the API token, or with ``registration_token`` only) and one worker."""
    port, worker_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    worker_id, worker_token = "w-test", "test-worker-token"
    tokens = (
        ["--registration-token", registration_token] if registration_token else ["--api-token", API_TOKEN]
    )
    orcd_cmd = [
        bin_path("rbees-orcd"), "--port", str(port), "--state-dir", str(tmp / "orcd"),
        *tokens, "--health-interval-s", "0.5", *orcd_args,
    ]  # fmt: skip
    operator_token = registration_token or API_TOKEN
    worker_cmd = [
        bin_path("rbees-workerd"), "--worker-id", worker_id, "--model", str(model_path),
        "--port", str(worker_port), "--model-id", MODEL_ID, "--slots", str(slots), "--threads", "1",
        "--token", worker_token, "--callback-url", f"{url}/v2/workers/register",
        "--callback-token", operator_token,
    ]  # fmt: skip
    with ManagedProcess(orcd_cmd, log=tmp / "orcd.log") as orcd:
        wait_http(f"{url}/health", timeout=60, proc=orcd)
        with ManagedProcess(worker_cmd, log=tmp / "worker.log") as worker:
            wait_worker_ready(url, worker_id, 180, [orcd, worker], operator_token)
            yield Cluster(
                url=url,
                worker_url=f"http://127.0.0.1:{worker_port}",
                worker_id=worker_id,
                worker_token=worker_token,
                model=MODEL_ID,
                api_token=API_TOKEN,
                orcd=orcd,
                worker=worker,
            )
