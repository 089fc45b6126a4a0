"""Server-sent events framing: ``id: N`` (optional) then ``data: <json>`` and a blank line."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import BaseModel


def encode_sse(event: BaseModel, event_id: int | str | None = None) -> bytes:
    """Frame one event. JSON never contains a raw newline, so one data line is enough."""
    data = event.model_dump_json(exclude_none=True)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {data}\n\n".encode()


@dataclass(frozen=True, slots=True)
class SSEMessage:
    data: str
    id: str | None = None
    event: str | None = None


class SSEParser:
    """Incremental SSE parser: feed it bytes as they arrive, get whole messages out.

    Bytes are buffered until a full line is present, so a multi-byte UTF-8 character split
    across network chunks is never decoded in halves.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._id: str | None = None
        self._event: str | None = None

    def feed(self, chunk: bytes) -> Iterator[SSEMessage]:
        self._buf += chunk
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return
            raw, self._buf = self._buf[:nl], self._buf[nl + 1 :]
            line = raw.rstrip(b"\r").decode("utf-8")
            msg = self._line(line)
            if msg is not None:
                yield msg

    def _line(self, line: str) -> SSEMessage | None:
        if line == "":
            if not self._data:
                self._event = None
                return None
            msg = SSEMessage(data="\n".join(self._data), id=self._id, event=self._event)
            self._data, self._event = [], None
            return msg
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "id":
            self._id = value
        elif field == "event":
            self._event = value
        return None
