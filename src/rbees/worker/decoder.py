"""The worker's one decode thread: it takes turns among the running jobs, one decode step each.

One thread instead of one per slot: on a CPU, slot threads fight over the GIL and the cores
(sixteen of them ran at a third of one job's tokens/s); on a GPU they would queue on the same
device anyway. With an engine that batches (``engines/decode_batch.py``), the first job of a round
to take its turn runs one forward pass for all of them and the others find their token waiting, so
a round of turns is one pass. A new job gets its first step (prompt prefill and first token)
before the running ones take their next turn, so a job's time to first token does not wait for a
whole rotation, and jobs that arrived together are prefilled in batches (``prefill_tokens``, see
``prefill.py``).
While the event loop admits a request (``admitting()``), the running jobs' next step waits for it
(a few milliseconds at most): in a burst, requests arriving one by one otherwise each started a
tug of war over the GIL with a decode step, which then took 10-15 ms instead of 2.5, and a request
in admission joins the newcomers' batch rather than waiting for the next one.

On a GPU a pass costs about the same for one row as for sixteen (tens of milliseconds for a
30-layer model, mostly launching its kernels). There, an idle worker that receives a request waits
while more keep arriving (``gather_share`` of the last prefill's time at most, see ``gather_window``):
a burst that reaches it spread over a few milliseconds (through an orchestrator, say) is prefilled
in one pass, instead of the first few requests in one and the rest a whole pass later. A lone
request waits ``GATHER_GAP_S`` for a second. And when a job ends, the running jobs' next step
waits a moment (``refill_share`` of the last prefill's time, see ``refill_window``) for a request to
take its slot: a client that sends its next request as soon as the last ended, or the orchestrator
dispatching a queued job to the freed slot, reaches the worker a millisecond or two later, and
would otherwise wait for the whole next pass before its prefill. On a CPU a pass's cost grows with
its rows, so both shares are 0 there: no waits.

The thread runs ``nice`` steps below the worker's other threads (Linux, where each thread has its
own nice value): when the event loop wakes up to admit a request or write a token, the kernel gives
it the CPU at once instead of letting it wait behind the decoding, which keeps every idle cycle.
On a host shared with an orchestrator and clients (a home lab's one box) their latency no longer
depends on when the decode thread is next preempted.

What a round of turns produced leaves in one go where the jobs' events go to an event channel
(``on_round``, called at the end of each round of the running jobs' turns, which is one forward pass
with a batching engine, after each newcomer's first token and before any wait).

    loop = DecodeLoop(nice=5, prefill_tokens=4096, on_round=channels.flush)
    with loop.admitting():             # on the event loop, around parsing and admitting a request
        loop.submit(generation, on_exit)   # from any thread; on_exit runs (in the decode thread)
    ...                                # once the generation is over, however it ended
    loop.stop()                        # abandons what is still running, frees its KV caches
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from rbees.worker.jobs import Generation
from rbees.worker.prefill import prefill_together

log = logging.getLogger(__name__)

# The longest a step of the running jobs waits for requests being admitted (one takes ~0.3 ms).
ADMISSION_WAIT_S = 0.005
# When a job ends, the others' next step waits for the request that takes its place for at most
# ``refill_share`` of the last prefill's time and REFILL_CAP_S, and not at all under REFILL_MIN_S.
REFILL_CAP_S = 0.005
REFILL_MIN_S = 0.0005
# A burst reaching an idle worker is gathered for at most ``gather_share`` of the last prefill's time
# and GATHER_CAP_S, not at all under GATHER_MIN_S. The first request waits GATHER_GAP_S for a second;
# once that came the burst is over when none came for a quarter of the window.
GATHER_CAP_S = 0.020
GATHER_MIN_S = 0.001
GATHER_GAP_S = 0.001


def gather_window(prefill_s: float, share: float) -> float:
    """How long an idle worker may gather a burst after its first request, given what its last
    prefill took: 0 where that would be under a millisecond."""
    window = min(GATHER_CAP_S, share * prefill_s)
    return window if window >= GATHER_MIN_S else 0.0


def refill_window(prefill_s: float, share: float) -> float:
    """How long the running jobs may wait, when one of them ends, for a request to take its slot,
    given what the last prefill took: 0 where that would be under half a millisecond."""
    window = min(REFILL_CAP_S, share * prefill_s)
    return window if window >= REFILL_MIN_S else 0.0


OnExit = Callable[[], None]
_Entry = tuple[Generation, OnExit]


class DecodeLoop:
    def __init__(
        self,
        name: str = "rbees-decode",
        nice: int = 0,
        admission_wait_s: float = ADMISSION_WAIT_S,
        prefill_tokens: int = 0,
        refill_share: float = 0.0,
        gather_share: float = 0.0,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        self._name = name
        self._nice = nice
        self._prefill_tokens = prefill_tokens
        self._admission_wait_s = admission_wait_s
        self._refill_share = refill_share
        self._gather_share = gather_share
        self._on_round = on_round
        self._incoming: queue.SimpleQueue[_Entry | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._admitting = 0  # requests the event loop is admitting now (written by the loop only)
        self._quiet = threading.Event()  # set while it admits none
        self._quiet.set()
        self.prefill_s = 0.0  # what the last newcomers' first steps took (prefill, first token)

    @contextlib.contextmanager
    def admitting(self) -> Iterator[None]:
        """Around the admission of a request on the event loop: meanwhile the decode thread does not
        start another step of the running jobs (for up to ``admission_wait_s``), so the two do not
        fight over the GIL and the newcomer's first step comes right after."""
        self._admitting += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._admitting -= 1
            if not self._admitting:
                self._quiet.set()

    def submit(self, generation: Generation, on_exit: OnExit) -> None:
        if self._stopped:
            raise RuntimeError("the decode loop is stopped")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._incoming.put((generation, on_exit))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after its current step; generations still running are abandoned."""
        self._stopped = True
        self._incoming.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        lower_thread_priority(self._nice)
        active: deque[_Entry] = deque()
        newcomers: list[_Entry] = []  # arrived, first step not taken yet
        try:
            waiting: list[_Entry | None] = []  # came while the running jobs waited for them
            round_left = 0  # turns left in this round of the running jobs
            while True:
                arrived, waiting = waiting, []
                if active:
                    if self._admitting:
                        self._round_over()
                        self._quiet.wait(self._admission_wait_s)
                else:
                    if not arrived:
                        self._round_over()
                        arrived = [self._incoming.get()]
                    arrived += self._gather(gather_window(self.prefill_s, self._gather_share))
                arrived += self._drain()
                newcomers = [entry for entry in arrived if entry is not None]
                if len(newcomers) < len(arrived):  # stop() was called
                    return
                running = len(active)
                # Newcomers first: their prefill and first token before the others' next step.
                if newcomers:
                    started = time.perf_counter()
                    self._prefill(newcomers)
                    for entry in newcomers:
                        self._turn(entry, active)
                        # Its first token goes out now, not after the other newcomers' turns: a write
                        # per new job, where the time to first token is at stake.
                        self._round_over()
                    self.prefill_s = time.perf_counter() - started
                newcomers = []
                if not running:
                    continue
                if round_left <= 0:  # every running job had its turn: the next one starts a pass
                    self._round_over()
                    round_left = running
                round_left -= 1
                if not self._turn(active.popleft(), active):
                    # A job ended: its client (or the orchestrator's queue) may send the next one.
                    window = refill_window(self.prefill_s, self._refill_share)
                    if window:
                        self._round_over()
                    waiting = self._await_one(window)
        finally:
            for generation, on_exit in [*newcomers, *active]:
                generation.abandon()
                _call(on_exit)

    def _round_over(self) -> None:
        """What the jobs' turns produced goes out now (``on_round``): at the end of a round of turns
        (one forward pass with a batching engine), after a newcomer's first token, before any wait."""
        if self._on_round is not None:
            try:
                self._on_round()
            except Exception:
                log.exception("the end-of-round hook failed")

    def _await_one(self, window_s: float) -> list[_Entry | None]:
        """The first request to arrive within ``window_s`` (waiting for one being admitted), if any."""
        deadline = time.monotonic() + window_s
        while (left := deadline - time.monotonic()) > 0:
            if self._admitting:
                self._quiet.wait(left)
            try:
                return [self._incoming.get(timeout=max(0.0, deadline - time.monotonic()))]
            except queue.Empty:
                if not self._admitting:
                    return []
        return []

    def _gather(self, window_s: float) -> list[_Entry | None]:
        """The requests that arrive within ``window_s`` of now while they keep coming (one being
        admitted counts as coming); none, and no wait, for a window of 0."""
        entries: list[_Entry | None] = []
        now = time.monotonic()
        deadline = now + window_s
        gap = GATHER_GAP_S  # for a second request; once one came, a burst is under way
        quiet_from = min(deadline, now + gap)
        while now < quiet_from:
            if self._admitting:
                self._quiet.wait(deadline - now)
            try:
                entry = self._incoming.get(timeout=max(0.0, quiet_from - time.monotonic()))
            except queue.Empty:
                if not self._admitting:
                    break
            else:
                entries.append(entry)
                if entry is None:  # stop() was called
                    break
                gap = max(GATHER_GAP_S, window_s / 4)
            now = time.monotonic()
            quiet_from = min(deadline, now + gap)
        return entries

    def _drain(self) -> list[_Entry | None]:
        entries: list[_Entry | None] = []
        while True:
            try:
                entries.append(self._incoming.get_nowait())
            except queue.Empty:
                return entries

    def _prefill(self, newcomers: list[_Entry]) -> None:
        if self._prefill_tokens <= 0 or len(newcomers) < 2:
            return
        try:
            prefill_together([generation for generation, _ in newcomers], self._prefill_tokens)
        except Exception:  # each job then prefills on its own at its first step
            log.exception("could not batch the prefill of %d job(s)", len(newcomers))

    @staticmethod
    def _turn(entry: _Entry, active: deque[_Entry]) -> bool:
        """One step of a job: True if it goes on, False once it ended (``on_exit`` was called)."""
        generation, on_exit = entry
        try:
            alive = generation.step()
        except Exception:  # step() reports model failures itself; anything else is a bug
            log.exception("decode step of job %s failed", generation.job.job_id)
            generation.abandon()
            alive = False
        if alive:
            active.append(entry)
        else:
            _call(on_exit)
        return alive


def lower_thread_priority(steps: int) -> None:
    """Make the calling thread ``steps`` nice values nicer (lower priority) than it is; Linux only
    (elsewhere nice is per process). Lowering one's own priority needs no privilege."""
    if steps <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except OSError as exc:  # e.g. a seccomp profile that forbids it: decoding works all the same
        log.warning("cannot lower the decode thread's priority: %s", exc)


def _call(on_exit: OnExit) -> None:
    try:
        on_exit()
    except Exception:
        log.exception("a job's exit callback failed")
