"""The SQLite registry: migrations recorded once, workers and job records survive reopening."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from rbees.orchestrator.registry import JobRecord, JobWriter, Registry, migrate
from rbees.protocol import WorkerRegistration

REG = WorkerRegistration(
    worker_id="w-1",
    uri="http://127.0.0.1:8001",
    model_ref="tiny",
    backend="cpu",
    device="cpu",
    slots_total=2,
    token="secret",
)


def test_migrations_run_once_and_are_recorded(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "x.sqlite3", isolation_level=None)
    assert migrate(db) == ["m001_workers", "m002_jobs"]
    assert migrate(db) == []
    names = [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY name")]
    assert names == ["m001_workers", "m002_jobs"]


def test_wal_and_reopen_keep_workers_and_jobs(tmp_path: Path) -> None:
    path = tmp_path / "state" / "orcd.sqlite3"
    reg = Registry.open(path)
    reg.upsert_worker(REG, 1.0)
    reg.save_job(JobRecord("job-a", "tiny", "interactive", "running", worker_id="w-1", created_at=2.0))
    reg.save_job(
        JobRecord("job-b", "tiny", "batch", "completed", created_at=3.0, decision={"policy": "least-loaded"})
    )
    reg.close()

    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reg = Registry.open(path)
    (w,) = reg.workers()
    assert w.registration == REG and w.registration.token == "secret"
    assert reg.fail_unfinished(10.0, "restarted") == 1
    a = reg.get_job("job-a")
    assert a is not None and a.status == "failed" and a.error_message == "restarted"
    b = reg.get_job("job-b")
    assert b is not None and b.status == "completed" and b.decision == {"policy": "least-loaded"}
    assert [j.job_id for j in reg.list_jobs()] == ["job-b", "job-a"]
    assert reg.delete_worker("w-1") and not reg.delete_worker("w-1")
    reg.close()


def test_job_writer_writes_in_the_background_and_flushes(tmp_path: Path) -> None:
    path = tmp_path / "orcd.sqlite3"
    Registry.open(path).close()
    writer = JobWriter(path)
    rec = JobRecord("job-w", "tiny", "interactive", "queued", created_at=1.0)
    writer.put(rec)
    rec.status = "completed"  # the row was taken at put time; this change is a later put's business
    writer.flush()
    reader = Registry.open(path)
    stored = reader.get_job("job-w")
    assert stored is not None and stored.status == "queued"
    writer.put(rec)
    writer.close()
    stored = reader.get_job("job-w")
    assert stored is not None and stored.status == "completed"
    reader.close()
