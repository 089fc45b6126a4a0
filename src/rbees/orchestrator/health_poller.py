"""Worker health: a pure state machine fed by a poll loop.

A worker remembered from before a restart is ``unpolled`` and joins on its first good poll. A worker
leaves scheduling after ``fail_threshold`` failed polls in a row and comes back after
``recover_threshold`` good ones. Each time it went down within the flap window doubles the good polls
it needs to come back (up to 8x), so a flapping worker is mostly left alone instead of bouncing in and
out. Health never touches running jobs: a stream that breaks is the dispatcher's business.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

log = logging.getLogger("rbees.orchestrator.health")

MAX_RECOVER_FACTOR = 8


@dataclass(frozen=True, slots=True)
class HealthRules:
    fail_threshold: int = 2
    recover_threshold: int = 2
    flap_window_s: float = 60.0


@dataclass(frozen=True, slots=True)
class HealthState:
    up: bool
    unpolled: bool = False
    fails: int = 0
    oks: int = 0
    downs: tuple[float, ...] = ()
    last_error: str | None = None

    def recover_needed(self, rules: HealthRules) -> int:
        factor: int = min(MAX_RECOVER_FACTOR, 1 << max(0, len(self.downs) - 1))
        return rules.recover_threshold * factor


def observe(state: HealthState, error: str | None, now: float, rules: HealthRules) -> HealthState:
    """The state after one poll; ``error`` is ``None`` for a good poll."""
    downs = tuple(t for t in state.downs if now - t <= rules.flap_window_s)
    if error is None:
        oks = state.oks + 1
        up = state.up or state.unpolled or oks >= state.recover_needed(rules)
        return replace(state, up=up, unpolled=False, fails=0, oks=oks, downs=downs, last_error=None)
    fails = state.fails + 1
    if state.up and fails >= rules.fail_threshold:
        return HealthState(up=False, fails=fails, oks=0, downs=(*downs, now), last_error=error)
    return replace(state, unpolled=False, fails=fails, oks=0, downs=downs, last_error=error)


@dataclass(frozen=True, slots=True)
class Probe:
    """One worker's answer to ``GET /health``; ``error`` is set when it did not answer usefully."""

    worker_id: str
    error: str | None
    body: dict[str, Any] | None = None


async def probe(
    session: aiohttp.ClientSession, worker_id: str, uri: str, token: str | None, timeout_s: float
) -> Probe:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with session.get(
            f"{uri}/health", headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status != 200:
                return Probe(worker_id, f"health answered HTTP {resp.status}")
            body = await resp.json(content_type=None)
    except TimeoutError:
        return Probe(worker_id, f"no health answer within {timeout_s:g}s")
    except (aiohttp.ClientError, ValueError) as exc:
        return Probe(worker_id, f"health check failed: {type(exc).__name__}: {exc}")
    if not isinstance(body, dict):
        return Probe(worker_id, "health answer is not a JSON object")
    if body.get("status") == "unhealthy":
        return Probe(worker_id, f"worker reports unhealthy: {body.get('error') or 'no detail'}", body)
    return Probe(worker_id, None, body)


Target = tuple[str, str, str | None]  # worker_id, uri, token


class HealthPoller:
    """Polls every worker on a fixed interval and hands each round of results to ``apply``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        targets: Callable[[], Sequence[Target]],
        apply: Callable[[Sequence[Probe], float], Awaitable[None]],
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._session = session
        self._targets = targets
        self._apply = apply
        self._interval = interval_s
        self._timeout = min(timeout_s, interval_s * 5)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rbees-health-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def poll_once(self) -> None:
        targets = self._targets()
        if not targets:
            return
        probes = await asyncio.gather(
            *(probe(self._session, wid, uri, tok, self._timeout) for wid, uri, tok in targets)
        )
        await self._apply(probes, time.monotonic())

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except (aiohttp.ClientError, OSError, ValueError) as exc:  # a bad round must not stop polling
                log.warning("health round failed: %s", exc)
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))
