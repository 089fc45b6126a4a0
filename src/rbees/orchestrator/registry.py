"""Durable state of the orchestrator in one SQLite file: the worker registry and job records.

WAL journal and a busy timeout, so readers never block the writer; schema changes are numbered
migration functions recorded in ``_migrations``. Job rows are written when a job is accepted and when
it finishes (never per token); a job that was not finished when the orchestrator stopped is marked
failed on the next start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rbees.protocol import WorkerRegistration

log = logging.getLogger("rbees.orchestrator.registry")

# --- migrations -------------------------------------------------------------------------------------


def _m001_workers(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE workers (
            worker_id TEXT PRIMARY KEY,
            registration TEXT NOT NULL,
            registered_at REAL NOT NULL,
            last_seen REAL
        )"""
    )


def _m002_jobs(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            priority TEXT NOT NULL,
            status TEXT NOT NULL,
            worker_id TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            started_at REAL,
            first_token_at REAL,
            finished_at REAL,
            tokens_in INTEGER,
            tokens_out INTEGER NOT NULL DEFAULT 0,
            stop_reason TEXT,
            error_code TEXT,
            error_message TEXT,
            decision TEXT
        )"""
    )
    db.execute("CREATE INDEX jobs_status ON jobs(status)")
    db.execute("CREATE INDEX jobs_created ON jobs(created_at)")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m001_workers, _m002_jobs]


def migrate(db: sqlite3.Connection) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction; return their names."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    applied = []
    for fn in MIGRATIONS:
        name = fn.__name__.lstrip("_")
        if name in done:
            continue
        with db:
            fn(db)
            db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
        applied.append(name)
    return applied


# --- records ----------------------------------------------------------------------------------------

FINISHED = ("completed", "failed", "cancelled")


@dataclass(slots=True)
class JobRecord:
    """The durable part of a job: enough to answer ``GET /v2/tasks/{id}`` after a restart."""

    job_id: str
    model: str
    priority: str
    status: str
    worker_id: str | None = None
    attempts: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    tokens_in: int | None = None
    tokens_out: int = 0
    stop_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    decision: dict[str, Any] | None = None


_JOB_COLUMNS = tuple(f.name for f in fields(JobRecord))
_DECISION_INDEX = _JOB_COLUMNS.index("decision")


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    registration: WorkerRegistration
    registered_at: float
    last_seen: float | None


class Registry:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @classmethod
    def open(cls, path: Path) -> Registry:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        migrate(db)
        db.isolation_level = "DEFERRED"
        return cls(db)

    def close(self) -> None:
        self._db.close()

    # workers

    def upsert_worker(self, reg: WorkerRegistration, now: float) -> None:
        with self._db:
            self._db.execute(
                """INSERT INTO workers (worker_id, registration, registered_at, last_seen)
                   VALUES (?, ?, ?, ?)
                   ON CONFLICT(worker_id) DO UPDATE SET registration=excluded.registration,
                       registered_at=excluded.registered_at, last_seen=excluded.last_seen""",
                (reg.worker_id, reg.model_dump_json(), now, now),
            )

    def delete_worker(self, worker_id: str) -> bool:
        with self._db:
            cur = self._db.execute("DELETE FROM workers WHERE worker_id=?", (worker_id,))
        return cur.rowcount > 0

    def workers(self) -> list[WorkerRecord]:
        """The registered workers; a stored registration that no longer reads as one (written by an
        older, laxer version) is left out with a warning rather than keeping the orchestrator down."""
        rows = self._db.execute(
            "SELECT worker_id, registration, registered_at, last_seen FROM workers ORDER BY worker_id"
        ).fetchall()
        records = []
        for worker_id, registration, registered_at, last_seen in rows:
            try:
                reg = WorkerRegistration.model_validate_json(registration)
            except ValidationError as exc:
                log.warning("ignoring the stored registration of worker %r: %s", worker_id, exc)
                continue
            records.append(WorkerRecord(reg, registered_at, last_seen))
        return records

    # jobs

    def save_job(self, rec: JobRecord) -> None:
        self.save_rows([_encoded(job_row(rec))])

    def save_rows(self, rows: list[tuple[Any, ...]]) -> None:
        with self._db:
            self._db.executemany(_UPSERT_JOB, rows)

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._db.execute(
            f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE job_id=?", (job_id,)
        ).fetchone()
        return _job(row) if row else None

    def list_jobs(self, limit: int = 100, status: str | None = None) -> list[JobRecord]:
        cols = ", ".join(_JOB_COLUMNS)
        if status is None:
            rows = self._db.execute(
                f"SELECT {cols} FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)
            ).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT {cols} FROM jobs WHERE status=? ORDER BY created_at DESC LIMIT ?", (status, limit)
            ).fetchall()
        return [_job(r) for r in rows]

    def fail_unfinished(self, now: float, message: str) -> int:
        """Mark every job that was queued or running as failed; return how many there were."""
        with self._db:
            cur = self._db.execute(
                f"""UPDATE jobs SET status='failed', finished_at=?, error_code='INTERNAL', error_message=?
                    WHERE status NOT IN ({", ".join("?" * len(FINISHED))})""",
                (now, message, *FINISHED),
            )
        return cur.rowcount


_UPSERT_JOB = (
    f"INSERT OR REPLACE INTO jobs ({', '.join(_JOB_COLUMNS)}) VALUES ({', '.join('?' * len(_JOB_COLUMNS))})"
)


def job_row(rec: JobRecord) -> tuple[Any, ...]:
    """A job record as a database row, taken now (the record keeps changing afterwards).

    The decision dict is replaced, never changed in place, so it is shared and encoded later.
    """
    return tuple(getattr(rec, name) for name in _JOB_COLUMNS)


def _encoded(row: tuple[Any, ...]) -> tuple[Any, ...]:
    decision = row[_DECISION_INDEX]
    if decision is None:
        return row
    return (*row[:_DECISION_INDEX], json.dumps(decision), *row[_DECISION_INDEX + 1 :])


class JobWriter:
    """Writes job rows on a thread of its own, so commits never hold up the event loop.

    Rows put from the event loop are handed to the thread a moment later (``HANDOFF_S``), or at the
    loop's next turn for a new job, in one batch, so the thread does not wake (and take the GIL) in the
    middle of a submission or before its dispatch. Rows
    that arrive while it writes go together in the next transaction. ``flush`` waits until everything
    put so far is on disk.
    """

    HANDOFF_S = 0.05

    def __init__(self, path: Path) -> None:
        self._path = path
        self._queue: queue.SimpleQueue[list[tuple[Any, ...]] | threading.Event | None] = queue.SimpleQueue()
        self._pending: list[tuple[Any, ...]] = []
        self._handoff: asyncio.Handle | None = None
        self._thread = threading.Thread(target=self._run, name="rbees-job-writer", daemon=True)
        self._thread.start()

    def put(self, rec: JobRecord, *, soon: bool = False) -> None:
        """Queue the record's row as it is now; ``soon``: hand it over at the loop's next turn
        (after the callbacks already due, such as a dispatch just scheduled) rather than in a moment."""
        self._pending.append(job_row(rec))
        if self._handoff is not None and not soon:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.hand_off()
            return
        if self._handoff is not None:
            self._handoff.cancel()
        if soon:
            self._handoff = loop.call_soon(self.hand_off)
        else:
            self._handoff = loop.call_later(self.HANDOFF_S, self.hand_off)

    def hand_off(self) -> None:
        """Give the rows put so far to the writing thread now."""
        if self._handoff is not None:
            self._handoff.cancel()
            self._handoff = None
        if self._pending:
            rows, self._pending = self._pending, []
            self._queue.put(rows)

    def flush(self, timeout: float = 5.0) -> None:
        self.hand_off()
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        self.hand_off()
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        registry = Registry.open(self._path)
        try:
            while True:
                items = [self._queue.get()]
                while not self._queue.empty():
                    items.append(self._queue.get())
                rows = [_encoded(row) for i in items if isinstance(i, list) for row in i]
                if rows:
                    try:
                        registry.save_rows(rows)
                    except sqlite3.Error as exc:
                        log.error("could not save %d job record(s): %s", len(rows), exc)
                for item in items:
                    if isinstance(item, threading.Event):
                        item.set()
                if any(item is None for item in items):
                    return
        finally:
            registry.close()


def _job(row: tuple[Any, ...]) -> JobRecord:
    rec = JobRecord(*row)
    if isinstance(rec.decision, str):
        rec.decision = json.loads(rec.decision)
    return rec
