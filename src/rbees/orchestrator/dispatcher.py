"""HTTP to the workers: ``POST /execute`` as a stream of events, and ``POST /cancel``.

One ``aiohttp.ClientSession`` per app, with no connection limit, serves every stream. Events are
yielded as ``(type, json_text)``; token events are recognised by their prefix so the hot path never
parses JSON, and anything else is parsed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from rbees.protocol import ErrorCode, SSEParser

log = logging.getLogger("rbees.orchestrator.dispatch")

TOKEN_PREFIX = '{"type":"token"'
NOT_RETRIABLE_STATUS = frozenset({400, 413, 422})
_DRAIN_S = 1.0
TERMINAL = frozenset({"end", "error"})


class DispatchRejected(Exception):
    """The worker answered ``/execute`` with an error status instead of a stream."""

    def __init__(self, status: int, code: ErrorCode, message: str, retriable: bool) -> None:
        super().__init__(f"worker answered HTTP {status} {code.value}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retriable = retriable


class StreamBroken(Exception):
    """The worker's stream ended or turned unreadable before its terminal event."""


def new_session() -> aiohttp.ClientSession:
    # Idle connections are dropped well before the workers' own keep-alive (30 s) would close them,
    # so a request never races a server-side close.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=15, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5),
        auto_decompress=False,
    )


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def execute(
    session: aiohttp.ClientSession,
    uri: str,
    token: str | None,
    body: bytes,
    on_event: Callable[[str, str], bool],
) -> None:
    """Stream one job from a worker into ``on_event(type, json_text)``, called synchronously as each
    event arrives (no extra task hop); it returns ``False`` to stop early. Returns after the terminal
    event.

    Raises ``DispatchRejected`` for an error answer, ``StreamBroken`` when the stream stops before a
    terminal event, and aiohttp/OS errors when the worker cannot be reached or dies mid-stream.
    """
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **_auth(token)}
    async with session.post(f"{uri}/execute", data=body, headers=headers) as resp:
        if resp.status != 200:
            raise await _rejection(resp)
        parser = SSEParser()
        read = resp.content.readany
        while chunk := await read():
            for msg in parser.feed(chunk):
                data = msg.data
                event_type = "token" if data.startswith(TOKEN_PREFIX) else event_type_of(data)
                if not on_event(event_type, data):
                    return
                if event_type in TERMINAL:
                    await _drain(resp)
                    return
    raise StreamBroken("the worker closed the stream before its end event")


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read the (empty) rest of a finished stream so the connection goes back to the pool."""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout(_DRAIN_S):
            await resp.content.read()


def event_type_of(data: str) -> str:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise StreamBroken(f"the worker sent an event that is not JSON: {data[:80]!r}") from exc
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str):
        raise StreamBroken(f"the worker sent an event without a type: {data[:80]!r}")
    return kind


async def _rejection(resp: aiohttp.ClientResponse) -> DispatchRejected:
    try:
        body = await resp.read()
    except aiohttp.ClientError:
        body = b""
    return rejection(resp.status, body)


def rejection(status: int, body: bytes) -> DispatchRejected:
    """A worker's error answer (the error envelope, when it is one) as ``DispatchRejected``."""
    code, message = ErrorCode.WORKER_FAILED, f"HTTP {status}"
    try:
        value: Any = json.loads(body)
        err = value.get("error", {}) if isinstance(value, dict) else {}
        code = ErrorCode(err.get("code", code))
        message = str(err.get("message", message))
    except (ValueError, AttributeError):
        pass  # not an envelope: keep the generic code and the HTTP status as the message
    return DispatchRejected(status, code, message, status not in NOT_RETRIABLE_STATUS)


async def cancel(
    session: aiohttp.ClientSession, uri: str, token: str | None, job_id: str, timeout_s: float
) -> bool:
    """Ask a worker to cancel a job; ``False`` (logged) when it could not be told."""
    try:
        async with session.post(
            f"{uri}/cancel",
            json={"job_id": job_id},
            headers=_auth(token),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            if resp.status < 300:
                return True
            log.warning("worker %s refused to cancel %s: HTTP %s", uri, job_id, resp.status)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        log.warning("could not cancel %s on %s: %s", job_id, uri, exc)
    return False
