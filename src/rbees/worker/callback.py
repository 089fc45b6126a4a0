"""The ready callback: once loaded, POST the ``WorkerRegistration`` to each callback URL.

Each URL is retried with exponential backoff until it answers 2xx, refuses for good (a 4xx
other than 408/429), or the attempts run out. Nothing here can stop the worker: failures are logged.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from rbees.protocol import WorkerRegistration

log = logging.getLogger(__name__)

_RETRYABLE_4XX = frozenset({408, 425, 429})


async def send_ready(
    url: str,
    registration: WorkerRegistration,
    *,
    token: str | None = None,
    attempts: int = 20,
    first_delay_s: float = 0.5,
    max_delay_s: float = 30.0,
    timeout_s: float = 10.0,
) -> bool:
    """POST ``registration`` to ``url``; True once a 2xx answer came back."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = registration.model_dump_json(exclude_none=True)
    delay = first_delay_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        for attempt in range(1, attempts + 1):
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    if 200 <= resp.status < 300:
                        log.info("ready callback to %s accepted (%d)", url, resp.status)
                        return True
                    detail = (await resp.text())[:200]
                    if 400 <= resp.status < 500 and resp.status not in _RETRYABLE_4XX:
                        log.error("ready callback to %s refused (%d): %s", url, resp.status, detail)
                        return False
                    problem = f"HTTP {resp.status}: {detail}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt == attempts:
                break
            log.warning("ready callback to %s failed (%s); retry %d in %.1fs", url, problem, attempt, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
    log.error("ready callback to %s gave up after %d attempts", url, attempts)
    return False
