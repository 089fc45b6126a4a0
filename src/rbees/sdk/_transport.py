"""The one HTTP seam of the SDK: JSON requests and SSE responses over a lazily opened aiohttp session."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp

from rbees.sdk._errors import RbeesConnectionError, RbeesProtocolError, RbeesTimeoutError, error_from_response


class Transport:
    """Talks to one base URL. Create it anywhere; the session opens on first use, in the running loop."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        stream_read_timeout: float | None = None,
    ) -> None:
        if "://" not in base_url:
            base_url = f"http://{base_url}"
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=stream_read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON answer or raise the typed error."""
        session = self._get_session()
        try:
            async with session.request(
                method, self.url(path), json=body, params=params, timeout=self._timeout
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise error_from_response(resp.status, raw, resp.headers)
                if not raw:
                    return None
                try:
                    return json.loads(raw)
                except ValueError as exc:
                    raise RbeesProtocolError(f"{method} {path}: answer is not JSON") from exc
        except TimeoutError as exc:
            raise RbeesTimeoutError(f"{method} {self.url(path)}: no answer in time") from exc
        except aiohttp.ClientError as exc:
            raise RbeesConnectionError(f"{method} {self.url(path)}: {exc}") from exc

    async def open_stream(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Open a streaming answer (SSE, or JSON where the server chose not to stream).

        The caller owns the returned response and must ``release()`` it.
        """
        session = self._get_session()
        try:
            resp = await session.request(
                method,
                self.url(path),
                json=body,
                headers={"Accept": "text/event-stream", **(headers or {})},
                timeout=self._stream_timeout,
            )
        except TimeoutError as exc:
            raise RbeesTimeoutError(f"{method} {self.url(path)}: no answer in time") from exc
        except aiohttp.ClientError as exc:
            raise RbeesConnectionError(f"{method} {self.url(path)}: {exc}") from exc
        if resp.status >= 400:
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                raw = b""
            finally:
                resp.release()
            raise error_from_response(resp.status, raw, resp.headers)
        return resp


def is_event_stream(resp: aiohttp.ClientResponse) -> bool:
    return resp.content_type == "text/event-stream"
