"""Scheduling by Starlark script: chosen when it answers, built-in policy when it fails or overruns."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbees.orchestrator.policy_script import ScriptPolicy
from rbees.orchestrator.scheduler import JobView, WorkerView, schedule
from rbees.orchestrator.settings import Policy

WORKERS = [
    WorkerView("w-gpu", "m", "workstation", True, "healthy", slots_total=4, slots_busy=3),
    WorkerView("w-cpu", "m", "blep", True, "healthy", slots_total=4, slots_busy=0),
    WorkerView("w-other", "x", "blep", True, "healthy", slots_total=4, slots_busy=0),
]
JOB = JobView("job-1", "m")
SLOW = """
def choose(job, workers):
    n = 0
    for i in range(100000000):
        n += i
    return None
"""


def script(tmp_path: Path, source: str, timeout_ms: int = 50) -> ScriptPolicy:
    path = tmp_path / "policy.star"
    path.write_text(source)
    return ScriptPolicy.load(path, timeout_ms)


def test_script_prefers_a_pool_even_when_busier(tmp_path: Path) -> None:
    policy = script(
        tmp_path,
        """
def choose(job, workers):
    for w in workers:
        if w["pool"] == "workstation":
            return w["worker_id"]
    return workers[0]["worker_id"]
""",
    )
    d = schedule(WORKERS, JOB, Policy.LEAST_LOADED, script=policy)
    assert d.worker_id == "w-gpu" and d.policy == "script:policy.star"
    assert d.reasons == {"w-cpu": "the script chose w-gpu", "w-other": "serves model 'x', not 'm'"}


def test_script_may_make_a_job_wait(tmp_path: Path) -> None:
    policy = script(tmp_path, "def choose(job, workers):\n    return None\n")
    d = schedule(WORKERS, JOB, script=policy)
    assert d.waits and d.wait_reason == "the policy script chose to wait"


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("def choose(job, workers):\n    return workers[7]['worker_id']\n", "out of bound"),
        ("def choose(job, workers):\n    return 'w-other'\n", "not one of the offered workers"),
        (SLOW, "time bound of 20 ms"),
    ],
    ids=["raises", "bad answer", "too slow"],
)
def test_failing_script_falls_back_to_the_built_in_policy(tmp_path: Path, source: str, error: str) -> None:
    policy = script(tmp_path, source, timeout_ms=20)
    d = schedule(WORKERS, JOB, Policy.LEAST_LOADED, script=policy)
    assert d.worker_id == "w-cpu"  # least-loaded
    assert d.policy.startswith("least-loaded (policy script policy.star failed: ")
    assert error in d.policy.lower()
    assert policy.failures == 1


def test_a_script_without_choose_or_with_a_syntax_error_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must define choose"):
        script(tmp_path, "x = 1\n")
    with pytest.raises(ValueError, match="policy script"):
        script(tmp_path, "def choose(:\n")


def test_script_has_no_io(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        script(tmp_path, "load('os', 'system')\ndef choose(job, workers):\n    return None\n")
    with pytest.raises(ValueError, match="`open` not found"):
        script(tmp_path, "def choose(job, workers):\n    return open('/etc/passwd')\n")
