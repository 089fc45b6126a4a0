"""The blocking SDK: thin facades that run the asyncio clients on a private event loop thread.

There is one implementation (``_async_client``); every blocking method here is one line that hands
the coroutine of its async twin to the loop thread and waits for the result.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine, Iterator, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from rbees.protocol import Event, ExecuteRequest, OrchestratorHealth, TaskAccepted, WorkerHealth
from rbees.sdk._async_client import DEFAULT_ORCHESTRATOR_URL, AsyncClient, AsyncWorkerClient, TaskLike
from rbees.sdk._models import JobInfo, ModelInfo, WorkerInfo
from rbees.sdk._stream import EventStream

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread; ``run`` blocks on one coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rbees-sdk-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("this client is closed")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt in the caller's thread: stop the work on the loop too.
            future.cancel()
            raise

    def stop(self, last: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run ``last`` (a clean-up coroutine) if the loop still runs, then stop and close the loop."""
        try:
            if last is not None:
                if self.loop.is_closed() or not self._thread.is_alive():
                    last.close()
                else:
                    self.run(last)
        finally:
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.loop.stop)
                if threading.current_thread() is not self._thread:
                    self._thread.join(timeout=5)
                if not self._thread.is_alive():
                    self.loop.close()


def _shutdown(runner: _LoopThread, closer: Any) -> None:
    runner.stop(closer())


class SyncEventStream:
    """Blocking iterator over one job's events; same attributes as :class:`EventStream`."""

    def __init__(self, stream: EventStream, runner: _LoopThread) -> None:
        self._stream = stream
        self._runner = runner

    @property
    def job_id(self) -> str | None:
        return self._stream.job_id

    @property
    def last_event_id(self) -> str | None:
        return self._stream.last_event_id

    @property
    def finished(self) -> bool:
        return self._stream.finished

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            return self._runner.run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Drop the connection (the job goes on; cancel it with ``Client.cancel``)."""
        self._runner.run(self._stream.aclose())

    def __enter__(self) -> SyncEventStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Client:
    """Blocking client of the orchestrator's API; see :class:`AsyncClient` for each method.

    ``with Client("http://127.0.0.1:8080") as client: for event in client.stream(request): ...``
    """

    def __init__(
        self,
        base_url: str = DEFAULT_ORCHESTRATOR_URL,
        *,
        api_token: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        stream_read_timeout: float | None = None,
        max_reconnects: int = 3,
    ) -> None:
        self._async = AsyncClient(
            base_url,
            api_token=api_token,
            timeout=timeout,
            connect_timeout=connect_timeout,
            stream_read_timeout=stream_read_timeout,
            max_reconnects=max_reconnects,
        )
        self._runner = _LoopThread()
        self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._async.aclose)

    @property
    def base_url(self) -> str:
        return self._async.base_url

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def enqueue(self, request: TaskLike) -> TaskAccepted:
        return self._runner.run(self._async.enqueue(request))

    def stream(self, request: TaskLike) -> SyncEventStream:
        return SyncEventStream(self._async.stream(request), self._runner)

    def events(self, job_id: str, last_event_id: str | int | None = None) -> SyncEventStream:
        return SyncEventStream(self._async.events(job_id, last_event_id), self._runner)

    def cancel(self, job_id: str) -> Any:
        return self._runner.run(self._async.cancel(job_id))

    def job(self, job_id: str) -> JobInfo:
        return self._runner.run(self._async.job(job_id))

    def jobs(self, *, status: str | None = None, limit: int | None = None) -> list[JobInfo]:
        return self._runner.run(self._async.jobs(status=status, limit=limit))

    def health(self) -> OrchestratorHealth:
        return self._runner.run(self._async.health())

    def workers(self) -> list[WorkerInfo]:
        return self._runner.run(self._async.workers())

    def remove_worker(self, worker_id: str) -> Any:
        return self._runner.run(self._async.remove_worker(worker_id))

    def models(self) -> list[ModelInfo]:
        return self._runner.run(self._async.models())


class WorkerClient:
    """Blocking direct client of one worker; see :class:`AsyncWorkerClient`."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        stream_read_timeout: float | None = None,
    ) -> None:
        self._async = AsyncWorkerClient(
            base_url,
            token=token,
            timeout=timeout,
            connect_timeout=connect_timeout,
            stream_read_timeout=stream_read_timeout,
        )
        self._runner = _LoopThread()
        self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._async.aclose)

    @property
    def base_url(self) -> str:
        return self._async.base_url

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def execute(self, request: ExecuteRequest | Mapping[str, Any]) -> SyncEventStream:
        return SyncEventStream(self._async.execute(request), self._runner)

    def cancel(self, job_id: str) -> Any:
        return self._runner.run(self._async.cancel(job_id))

    def health(self) -> WorkerHealth:
        return self._runner.run(self._async.health())
