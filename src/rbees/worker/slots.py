"""Which jobs hold the worker's slots. Touched only from the event loop, so no locks.

A slot is taken when a request is admitted, before its prompt is encoded, and holds the job's
cancel flag from then on, so a cancel that arrives while the prompt is still encoding counts.
"""

from __future__ import annotations

import asyncio

from rbees.protocol import ErrorCode, RbeesError

SLOTS_RETRY_AFTER_S = 1.0


class Flag:
    """A one-way flag shared between the event loop and the decode thread: ``set()`` on one side,
    ``is_set()`` polled on the other (a single attribute store and load, atomic under the GIL).
    Nothing ever waits on it, so it needs none of ``threading.Event``'s lock and condition."""

    __slots__ = ("_on",)

    def __init__(self) -> None:
        self._on = False

    def set(self) -> None:
        self._on = True

    def is_set(self) -> bool:
        return self._on


class SlotTable:
    def __init__(self, total: int) -> None:
        self.total = total
        self._cancel_flags: dict[str, Flag] = {}
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def busy(self) -> int:
        return len(self._cancel_flags)

    def reserve(self, job_id: str) -> Flag:
        """Take a slot for ``job_id``; return the job's cancel flag."""
        if job_id in self._cancel_flags:
            raise RbeesError(
                ErrorCode.INVALID_REQUEST,
                f"job {job_id!r} is already running on this worker; job ids must be unique",
                details={"job_id": job_id, "reason": "duplicate_job_id"},
            )
        if len(self._cancel_flags) >= self.total:
            raise RbeesError(
                ErrorCode.ALL_SLOTS_BUSY,
                f"all {self.total} slot(s) of this worker are busy",
                details={"slots_total": self.total},
                retry_after=SLOTS_RETRY_AFTER_S,
            )
        flag = self._cancel_flags[job_id] = Flag()
        self.idle.clear()
        return flag

    def release(self, job_id: str, flag: Flag) -> None:
        """Free the slot taken with ``flag`` (a later job reusing the id keeps its own)."""
        if self._cancel_flags.get(job_id) is flag:
            del self._cancel_flags[job_id]
        if not self._cancel_flags:
            self.idle.set()

    def cancel(self, job_id: str) -> bool:
        """Ask ``job_id`` to stop at its next decode step; False if it holds no slot."""
        flag = self._cancel_flags.get(job_id)
        if flag is None:
            return False
        flag.set()
        return True

    def cancel_all(self) -> None:
        for flag in self._cancel_flags.values():
            flag.set()
