"""The worker's state and domain logic: loading, admission, running jobs, cancel, drain.

Everything here runs on the event loop except the model load (one background thread) and the
decoding (one decode thread that takes turns among the running jobs, ``DecodeLoop``). Once a job's
response has started, the decode thread writes its token frames to the client's socket itself
(``FrameSink``); the terminal frame, and any frame that cannot go out at once, go through the job's
queue to the loop. A job sent to an event channel (``channel.py``) has its events written there instead,
a round of turns at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from rbees.heap import freeze_startup_heap
from rbees.httpd import LastFrame
from rbees.protocol import (
    Backend,
    ErrorCode,
    ExecuteRequest,
    RbeesError,
    StartedEvent,
    WorkerHealth,
    WorkerRegistration,
    WorkerStatus,
    encode_sse,
)
from rbees.protocol.events import Event, is_terminal
from rbees.worker.callback import send_ready
from rbees.worker.channel import Channel, ChannelTable
from rbees.worker.decoder import DecodeLoop
from rbees.worker.direct import FrameSink, Item
from rbees.worker.engines.base import Engine, EngineLoader, PromptError
from rbees.worker.jobs import Generation, Job
from rbees.worker.settings import WorkerSettings
from rbees.worker.slots import Flag, SlotTable

log = logging.getLogger(__name__)

LOADING_RETRY_AFTER_S = 2.0
# Prompts up to this size are tokenized on the event loop (tens of microseconds): a hop to a thread
# and back costs more than that, and far more while the decode thread holds the GIL. Longer ones go
# to a thread so they never stall the other streams.
INLINE_ENCODE_CHARS = 8192
# Seeds for requests that bring none: a seed is no secret, and ``secrets`` reads the OS's random device
# with the GIL released, which on the event loop means waiting to get it back from the decode thread.
_SEEDS = random.Random()
_CANCEL_GRACE_S = 30.0


class WorkerRuntime:
    def __init__(
        self, settings: WorkerSettings, engine_loader: EngineLoader, device: str, model_name: str
    ) -> None:
        self.settings = settings
        self.device = device
        self.model_name = model_name
        self.status = WorkerStatus.LOADING
        self.engine: Engine | None = None
        self.error: str | None = None
        self.slots = SlotTable(settings.slots)
        self.load_failed = asyncio.Event()
        self._loader = engine_loader
        self._started = time.monotonic()
        self.channels = ChannelTable()
        self._decoder = DecodeLoop(
            nice=settings.decode_nice,
            prefill_tokens=settings.prefill_batch_tokens,
            refill_share=settings.refill_share,
            gather_share=settings.gather_share,
            on_round=self.channels.flush,
        )
        self._background: set[asyncio.Task[bool]] = set()

    # --- loading -----------------------------------------------------------------------------

    def start_loading(self) -> None:
        loop = asyncio.get_running_loop()

        def load() -> None:
            try:
                engine = self._loader()
            except Exception as exc:
                log.debug("model load failed", exc_info=True)
                loop.call_soon_threadsafe(self._on_load_failed, f"{exc}")
            else:
                loop.call_soon_threadsafe(self._on_loaded, engine)

        threading.Thread(target=load, name="rbees-load", daemon=True).start()

    def _on_loaded(self, engine: Engine) -> None:
        # The model and the libraries stay loaded: later full GC passes (which hold the GIL, so
        # they stall the decode thread too) walk only what the jobs allocate.
        freeze_startup_heap()
        self.engine = engine
        if self.status is WorkerStatus.LOADING:
            self.status = WorkerStatus.HEALTHY
        log.info("worker %s ready: %s on %s", self.settings.worker_id, self.model_name, engine.device)
        registration = self.registration()
        for url in self.settings.callback_urls:
            task = asyncio.create_task(send_ready(url, registration, token=self.settings.callback_token))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _on_load_failed(self, message: str) -> None:
        self.status = WorkerStatus.UNHEALTHY
        self.error = message
        log.error("cannot load the model: %s", message)
        self.load_failed.set()

    # --- reports -------------------------------------------------------------------------------

    def health(self) -> WorkerHealth:
        engine = self.engine
        return WorkerHealth(
            status=self.status,
            worker_id=self.settings.worker_id,
            model=self.model_name,
            backend=self.settings.backend,
            device=self.device,
            vram_bytes=engine.memory_bytes() if engine else 0,
            slots_total=self.slots.total,
            slots_busy=self.slots.busy,
            uptime_s=round(time.monotonic() - self._started, 3),
            context_length=engine.context_length if engine else None,
            error=self.error,
        )

    def registration(self) -> WorkerRegistration:
        s = self.settings
        return WorkerRegistration(
            worker_id=s.worker_id,
            uri=s.uri,
            model_ref=self.model_name,
            backend=s.backend,
            device=self.device,
            gpu=None if s.backend is Backend.CPU else (s.gpu or 0),
            vram_bytes=self.engine.memory_bytes() if self.engine else 0,
            slots_total=s.slots,
            pool=s.pool,
            token=s.token,
        )

    # --- jobs ------------------------------------------------------------------------------------

    def ready_engine(self) -> Engine:
        if self.status is WorkerStatus.DRAINING:
            raise RbeesError(ErrorCode.SHUTTING_DOWN, "this worker is shutting down", retry_after=1)
        if self.engine is None and self.error is None:
            raise RbeesError(
                ErrorCode.MODEL_LOADING, "the model is still loading", retry_after=LOADING_RETRY_AFTER_S
            )
        if self.engine is None:
            raise RbeesError(ErrorCode.WORKER_FAILED, f"the model failed to load: {self.error}")
        return self.engine

    def admitting(self) -> contextlib.AbstractContextManager[None]:
        """Wrap the admission of a request (parsing it, ``start_job``): the decode thread waits
        with its next step meanwhile, so a burst of requests is admitted without GIL contention."""
        return self._decoder.admitting()

    async def start_job(self, request: ExecuteRequest) -> tuple[Job, JobStream]:
        """Admit ``request``, start its decoding; return the job and its SSE stream."""
        job = await self._admit(request)
        started = encode_sse(self._started_event(job))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Item] = asyncio.Queue()
        sink = FrameSink(loop, queue, on_broken=job.cancel.set)
        ended = Flag()

        def finish(last: bytes | None) -> None:  # in the loop, once the decode thread is done
            sink.close()
            # Free the slot before the client can see the terminal event, so a client that
            # sends its next request as soon as this one ends never finds the slot still taken.
            self.slots.release(job.job_id, job.cancel)
            if last is not None:
                queue.put_nowait(LastFrame(last))
            queue.put_nowait(None)

        def emit(event: Event) -> None:  # in the decode thread
            frame = encode_sse(event)
            if is_terminal(event):
                ended.set()
                loop.call_soon_threadsafe(finish, frame)
            else:
                sink.put(frame)

        self._submit(job, emit, ended, finish)
        return job, JobStream(started, queue, sink)

    async def start_on_channel(self, request: ExecuteRequest, channel: Channel) -> Job:
        """Admit ``request`` and start its decoding with its events on ``channel``."""
        job = await self._admit(request)
        try:
            channel.add(job.job_id, job.cancel)
        except BaseException:
            self.slots.release(job.job_id, job.cancel)
            raise
        loop = asyncio.get_running_loop()
        ended = Flag()
        prefix = job.job_id.encode() + b" "

        def finish(last: bytes | None) -> None:  # in the loop, once the decode thread is done
            self.slots.release(job.job_id, job.cancel)  # before the terminal line, as on a stream
            channel.put_last(job.job_id, last)

        def emit(event: Event) -> None:  # in the decode thread
            line = prefix + event.model_dump_json(exclude_none=True).encode() + b"\n"
            if is_terminal(event):
                ended.set()
                loop.call_soon_threadsafe(finish, line)
            else:
                channel.put(line)

        # Out with the job's first token, at the end of the round that makes it.
        channel.put(prefix + self._started_event(job).model_dump_json(exclude_none=True).encode() + b"\n")
        self._submit(job, emit, ended, finish)
        return job

    def _submit(
        self, job: Job, emit: Callable[[Event], None], ended: Flag, finish: Callable[[bytes | None], None]
    ) -> None:
        engine = self.engine
        assert engine is not None
        loop = asyncio.get_running_loop()

        def exited() -> None:  # in the decode thread, after the job's last step
            if not ended.is_set():
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(finish, None)

        self._decoder.submit(Generation(engine, job, emit), exited)

    def _started_event(self, job: Job) -> StartedEvent:
        return StartedEvent(
            job_id=job.job_id,
            model=self.model_name,
            started_at=datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            seed=job.seed,
            tokens_in=len(job.prompt_ids),
            worker_id=self.settings.worker_id,
        )

    async def _admit(self, request: ExecuteRequest) -> Job:
        """Take a slot for ``request`` and tokenize its prompt; the job, not yet decoding."""
        engine = self.ready_engine()
        cancel = self.slots.reserve(request.job_id)
        try:
            if _prompt_chars(request) <= INLINE_ENCODE_CHARS:
                prompt_ids = engine.encode(request.prompt, request.messages)
            else:
                prompt_ids = await asyncio.to_thread(engine.encode, request.prompt, request.messages)
            context = engine.context_length
            if len(prompt_ids) >= context:
                raise RbeesError(
                    ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                    f"the prompt is {len(prompt_ids)} tokens; the model's context holds {context} "
                    "and needs room for at least one generated token",
                    details={"prompt_tokens": len(prompt_ids), "context_length": context},
                )
        except PromptError as exc:
            self.slots.release(request.job_id, cancel)
            raise RbeesError(ErrorCode.INVALID_REQUEST, str(exc)) from exc
        except BaseException:
            self.slots.release(request.job_id, cancel)
            raise
        seed = request.seed if request.seed is not None else _SEEDS.getrandbits(32)
        return Job(job_id=request.job_id, request=request, prompt_ids=prompt_ids, seed=seed, cancel=cancel)

    def cancel(self, job_id: str) -> bool:
        """Ask a running job to stop at its next decode step; False if no such job runs."""
        return self.slots.cancel(job_id)

    # --- shutdown ----------------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work, give running jobs ``timeout_s`` to finish, then cancel the rest."""
        self.status = WorkerStatus.DRAINING
        if not await self._wait_idle(timeout_s):
            log.warning("drain deadline passed; cancelling %d running job(s)", self.slots.busy)
            self.cancel_all()
            await self._wait_idle(_CANCEL_GRACE_S)
        self.channels.close_all()  # their answers end, so the server can stop
        for task in list(self._background):
            task.cancel()

    def cancel_all(self) -> None:
        self.slots.cancel_all()

    async def _wait_idle(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.slots.idle.wait()
        return self.slots.busy == 0

    def close(self) -> None:
        self._decoder.stop()


def _prompt_chars(request: ExecuteRequest) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(m.content) for m in request.messages or ())


class JobStream:
    """One job's SSE frames for its response: the ``started`` frame, then whatever the decode thread
    left to the loop (``frames()``); ``sink`` takes the token frames over once the response started."""

    def __init__(self, first: bytes, queue: asyncio.Queue[Item], sink: FrameSink) -> None:
        self.first = first
        self.sink = sink
        self._queue = queue

    async def frames(self) -> AsyncIterator[bytes]:
        """Frames that queued up meanwhile go out in one write; the terminal event (a ``LastFrame``)
        ends the response in the same write."""
        queue = self._queue
        while True:
            item = await queue.get()
            parts: list[bytes] = []
            while item is not None:
                parts.append(item)
                if isinstance(item, LastFrame):
                    yield LastFrame(b"".join(parts))
                    return
                if queue.empty():
                    break
                item = queue.get_nowait()
            if parts:
                yield parts[0] if len(parts) == 1 else b"".join(parts)
            if item is None:
                return
