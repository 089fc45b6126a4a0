"""The asyncio SDK: :class:`AsyncClient` for the orchestrator, :class:`AsyncWorkerClient` for one worker."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ValidationError

from rbees.protocol import ExecuteRequest, OrchestratorHealth, TaskAccepted, TaskRequest, WorkerHealth
from rbees.sdk._errors import RbeesProtocolError
from rbees.sdk._models import JobInfo, ModelInfo, WorkerInfo
from rbees.sdk._stream import EventStream
from rbees.sdk._transport import Transport

DEFAULT_ORCHESTRATOR_URL = "http://127.0.0.1:8080"

TaskLike = TaskRequest | Mapping[str, Any]
M = TypeVar("M", bound=BaseModel)


def _body(request: BaseModel | Mapping[str, Any]) -> Any:
    if isinstance(request, BaseModel):
        return request.model_dump(mode="json", exclude_none=True)
    return dict(request)


def _parse(model: type[M], doc: Any, what: str) -> M:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise RbeesProtocolError(f"unexpected {what} answer: {exc}") from exc


def _items(doc: Any, *keys: str) -> list[Any]:
    """The list in an answer that is either a bare list or an object holding one under ``keys``."""
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        for key in keys:
            if isinstance(doc.get(key), list):
                return list(doc[key])
    raise RbeesProtocolError(f"expected a list (or an object with one of {keys}), got {type(doc).__name__}")


def _job_path(job_id: str, tail: str = "") -> str:
    return f"/v2/tasks/{quote(job_id, safe='')}{tail}"


class AsyncClient:
    """Client of the orchestrator's API (``rbees-orcd``).

    ``async with AsyncClient("http://127.0.0.1:8080") as client:`` then
    ``async for event in client.stream({"model": "m", "prompt": "Hi"}): ...``.
    Error answers raise the :class:`RbeesAPIError` subclass of their code. Use one client from one
    event loop.
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
        self._http = Transport(
            base_url,
            token=api_token,
            timeout=timeout,
            connect_timeout=connect_timeout,
            stream_read_timeout=stream_read_timeout,
        )
        self.max_reconnects = max_reconnects

    @property
    def base_url(self) -> str:
        return self._http.base_url

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def enqueue(self, request: TaskLike) -> TaskAccepted:
        """Submit a job; returns at once with its id, queue position and events URL."""
        doc = await self._http.request_json("POST", "/v2/tasks", body=_body(request))
        return _parse(TaskAccepted, doc, "POST /v2/tasks")

    def stream(self, request: TaskLike) -> EventStream:
        """Submit a job and stream its events: ``queued``, ``started``, ``token``..., ``end`` or ``error``."""
        body = _body(request)
        return EventStream(
            self._http,
            lambda: self._http.open_stream("POST", "/v2/tasks", body=body),
            max_reconnects=self.max_reconnects,
        )

    def events(self, job_id: str, last_event_id: str | int | None = None) -> EventStream:
        """Follow a job's events from the start, or after ``last_event_id`` to resume."""
        last = None if last_event_id is None else str(last_event_id)
        return EventStream(
            self._http, None, job_id=job_id, last_event_id=last, max_reconnects=self.max_reconnects
        )

    async def cancel(self, job_id: str) -> Any:
        """Ask the orchestrator to cancel a job (idempotent); its stream then ends with ``CANCELLED``."""
        return await self._http.request_json("POST", _job_path(job_id, "/cancel"))

    async def job(self, job_id: str) -> JobInfo:
        return _parse(JobInfo, await self._http.request_json("GET", _job_path(job_id)), "job")

    async def jobs(self, *, status: str | None = None, limit: int | None = None) -> list[JobInfo]:
        """Recent jobs, newest first (``GET /v2/tasks``)."""
        params = {k: str(v) for k, v in (("status", status), ("limit", limit)) if v is not None}
        doc = await self._http.request_json("GET", "/v2/tasks", params=params)
        return [_parse(JobInfo, item, "job") for item in _items(doc, "tasks", "jobs", "data")]

    async def health(self) -> OrchestratorHealth:
        return _parse(OrchestratorHealth, await self._http.request_json("GET", "/health"), "health")

    async def workers(self) -> list[WorkerInfo]:
        doc = await self._http.request_json("GET", "/v2/workers")
        return [_parse(WorkerInfo, item, "worker") for item in _items(doc, "workers", "data")]

    async def remove_worker(self, worker_id: str) -> Any:
        """Deregister a worker (``DELETE /v2/workers/{id}``); the process itself is the pool's to stop."""
        return await self._http.request_json("DELETE", f"/v2/workers/{quote(worker_id, safe='')}")

    async def models(self) -> list[ModelInfo]:
        """Models some registered worker serves (the OpenAI-compatible ``GET /v1/models``)."""
        doc = await self._http.request_json("GET", "/v1/models")
        return [_parse(ModelInfo, item, "model") for item in _items(doc, "data", "models")]


class AsyncWorkerClient:
    """Direct client of one worker (``rbees-workerd``), as the orchestrator itself calls it."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        stream_read_timeout: float | None = None,
    ) -> None:
        self._http = Transport(
            base_url,
            token=token,
            timeout=timeout,
            connect_timeout=connect_timeout,
            stream_read_timeout=stream_read_timeout,
        )

    @property
    def base_url(self) -> str:
        return self._http.base_url

    async def __aenter__(self) -> AsyncWorkerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def execute(self, request: ExecuteRequest | Mapping[str, Any]) -> EventStream:
        """Run one job on the worker and stream its events (no ``queued``, no resume)."""
        body = _body(request)
        body.setdefault("job_id", f"job-{uuid.uuid4().hex[:12]}")
        return EventStream(
            self._http,
            lambda: self._http.open_stream("POST", "/execute", body=body),
            job_id=str(body["job_id"]),
            resumable=False,
        )

    async def cancel(self, job_id: str) -> Any:
        return await self._http.request_json("POST", "/cancel", body={"job_id": job_id})

    async def health(self) -> WorkerHealth:
        return _parse(WorkerHealth, await self._http.request_json("GET", "/health"), "worker health")
