"""Keep the cyclic garbage collector's full passes short in the long-running daemons.

A full collection walks every tracked object and holds the GIL meanwhile. What a daemon loads at
start-up (FastAPI, pydantic schemas, aiohttp; in a worker torch, transformers and the model) is
there for good, yet each full pass walked it again: ~55 ms in ``rbees-orcd`` and ~260 ms in a worker
on a small VM, a stall of every stream (and of the worker's decode thread) whenever one ran.
``freeze_startup_heap()`` collects what start-up left behind once, then moves the rest out of the
collector's sight (``gc.freeze``), so later passes only walk what came after: the jobs.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object alive now; returns how many are frozen."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("froze %d start-up objects in %.0f ms", frozen, (time.perf_counter() - started) * 1e3)
    return frozen
