"""Tokens: clients need the API token, workers the registration token, /health is open."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.orchestrator.conftest import Orcd, run_orcd

API, REG = "client-secret", "worker-secret"
REGISTRATION = {
    "worker_id": "w-1",
    "uri": "http://127.0.0.1:9",
    "model_ref": "m",
    "backend": "cpu",
    "device": "cpu",
    "slots_total": 1,
}


@pytest.fixture(scope="module")
def orcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orcd]:
    state = tmp_path_factory.mktemp("auth") / "state"
    with run_orcd(state, "--api-token", API, "--registration-token", REG) as orcd:
        orcd.token = None  # each test says which token it sends
        yield orcd


def test_health_is_open(orcd: Orcd) -> None:
    r = orcd.call("/health")
    assert r.status == 200 and r.body["status"] == "healthy"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v2/tasks", {"model": "m", "prompt": "hi"}),
        ("GET", "/v2/tasks", None),
        ("GET", "/v2/tasks/job-x", None),
        ("GET", "/v2/tasks/job-x/events", None),
        ("POST", "/v2/tasks/job-x/cancel", None),
        ("GET", "/v2/models", None),
        ("GET", "/metrics", None),
    ],
)
def test_client_routes_need_the_api_token(orcd: Orcd, method: str, path: str, body: object) -> None:
    missing = orcd.call(path, method, body)
    assert missing.status == 401 and missing.body["error"]["code"] == "UNAUTHORIZED"
    wrong = orcd.call(path, method, body, token="nope")  # unknown here: 401, as workers answer
    assert wrong.status == 401 and wrong.body["error"]["code"] == "UNAUTHORIZED"
    other = orcd.call(path, method, body, token=REG)  # a token of this orchestrator, another role
    assert other.status == 403 and other.body["error"]["code"] == "FORBIDDEN"
    assert orcd.call(path, method, body, token=API).status not in (401, 403)


def test_registration_needs_the_registration_token(orcd: Orcd) -> None:
    assert orcd.call("/v2/workers/register", "POST", REGISTRATION).status == 401
    assert orcd.call("/v2/workers/register", "POST", REGISTRATION, token=API).status == 403
    assert orcd.call("/v2/workers/register", "POST", REGISTRATION, token="nope").status == 401
    r = orcd.call("/v2/workers/register", "POST", REGISTRATION, token=REG)
    assert r.status == 200 and r.body["worker_id"] == "w-1"
    # operators may list and remove workers with either token
    assert orcd.call("/v2/workers").status == 401
    assert "w-1" in {w["worker_id"] for w in orcd.call("/v2/workers", token=API).body["workers"]}
    assert orcd.call("/v2/workers/w-1", "DELETE", token=REG).status == 200


def test_default_bind_is_loopback(tmp_path: Path) -> None:
    from rbees.orchestrator.main import load_settings

    assert load_settings(["--state-dir", str(tmp_path)], {}).host == "127.0.0.1"


def test_a_missing_token_says_which_scheme_to_use(orcd: Orcd) -> None:
    r = orcd.call("/v2/tasks", "POST", {"model": "m", "prompt": "hi"})
    assert r.status == 401 and r.headers["www-authenticate"] == "Bearer"


def test_an_oversized_submission_is_a_400_before_anything_is_queued(orcd: Orcd) -> None:
    r = orcd.call("/v2/tasks", "POST", {"model": "m", "prompt": "x" * 17_000_000}, token=API)
    assert r.status == 400 and r.body["error"]["code"] == "INVALID_REQUEST"
    assert r.body["error"]["details"]["max_body_bytes"] == 16 * 1024 * 1024
    assert orcd.call("/health").body["queue_depth"] == 0
