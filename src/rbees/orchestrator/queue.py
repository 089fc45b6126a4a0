"""The bounded job queue: interactive strictly before batch, FIFO within a class.

The queue holds job ids only; it does no I/O and knows nothing of workers. ``queue_position`` is the
number of jobs that would go out before this one (0 = next).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from rbees.protocol import ErrorCode, Priority, RbeesError

_ORDER = (Priority.INTERACTIVE, Priority.BATCH)


class JobQueue:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lanes: dict[Priority, deque[str]] = {p: deque() for p in _ORDER}

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def __iter__(self) -> Iterator[str]:
        """Job ids in the order they go out."""
        for p in _ORDER:
            yield from tuple(self._lanes[p])

    @property
    def priorities(self) -> tuple[Priority, ...]:
        return _ORDER

    def depth(self, priority: Priority) -> int:
        return len(self._lanes[priority])

    def push(self, job_id: str, priority: Priority) -> int:
        """Append a new job; raises QUEUE_FULL (429) when the queue is at capacity."""
        if len(self) >= self.capacity:
            raise RbeesError(
                ErrorCode.QUEUE_FULL,
                f"the queue is full ({self.capacity} jobs waiting); try again shortly",
                retry_after=retry_after_hint(len(self)),
            )
        self._lanes[priority].append(job_id)
        return self.position(job_id, priority)

    def push_front(self, job_id: str, priority: Priority) -> None:
        """Put back a job whose dispatch failed; it already waited its turn, and capacity does not apply."""
        self._lanes[priority].appendleft(job_id)

    def remove(self, job_id: str, priority: Priority) -> bool:
        try:
            self._lanes[priority].remove(job_id)
        except ValueError:
            return False
        return True

    def position(self, job_id: str, priority: Priority) -> int:
        ahead = 0
        for p in _ORDER:
            if p is priority:
                return ahead + self._lanes[p].index(job_id)
            ahead += len(self._lanes[p])
        raise ValueError(job_id)

    def find(self, job_id: str, priority: Priority) -> int | None:
        """The position, or ``None`` for a job not in the queue (e.g. waiting out a retry backoff)."""
        try:
            return self.position(job_id, priority)
        except ValueError:
            return None


def retry_after_hint(depth: int) -> float:
    """A client told QUEUE_FULL should wait longer the deeper the queue; between 1 and 30 seconds."""
    return float(min(30, max(1, depth // 64)))
