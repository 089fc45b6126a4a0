"""The bounded queue: interactive strictly before batch, FIFO within a class, 429 when full."""

from __future__ import annotations

import pytest

from rbees.orchestrator.queue import JobQueue
from rbees.protocol import ErrorCode, Priority, RbeesError

INT, B = Priority.INTERACTIVE, Priority.BATCH


def test_interactive_goes_before_batch_and_fifo_within_a_class() -> None:
    q = JobQueue(10)
    assert q.push("b1", B) == 0
    assert q.push("i1", INT) == 0
    assert q.push("b2", B) == 2
    assert q.push("i2", INT) == 1
    assert list(q) == ["i1", "i2", "b1", "b2"]
    assert q.position("b1", B) == 2


def test_full_queue_refuses_with_retry_after() -> None:
    q = JobQueue(2)
    q.push("a", INT)
    q.push("b", B)
    with pytest.raises(RbeesError) as err:
        q.push("c", INT)
    assert err.value.code is ErrorCode.QUEUE_FULL
    assert err.value.status == 429
    assert "Retry-After" in err.value.headers()


def test_retried_job_goes_back_to_the_front_of_its_class_even_when_full() -> None:
    q = JobQueue(2)
    q.push("i1", INT)
    q.push("b1", B)
    q.push_front("i0", INT)
    assert list(q) == ["i0", "i1", "b1"]


def test_remove_and_find() -> None:
    q = JobQueue(5)
    q.push("a", INT)
    q.push("b", INT)
    assert q.remove("a", INT)
    assert not q.remove("a", INT)
    assert q.find("a", INT) is None
    assert q.find("b", INT) == 0
    assert len(q) == 1
