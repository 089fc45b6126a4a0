"""``EventFrames``: a job's events, stored so that the cyclic garbage collector never walks them.

The orchestrator keeps every event of a job (a thousand finished jobs by default) so that any client can
replay it. Kept as one Python object per event, the retained logs of long answers made each full
collection walk hundreds of thousands of objects while every stream waited (1000 jobs of 512 tokens:
~85 ms a pass on a small VM); even as lists of ``bytes`` each pass still visits every item. Here a log
is a ``bytearray`` of SSE frames back to back (not tracked by the collector) plus two ``array`` columns
(where each frame ends, which type it has; tracked, but with nothing inside to visit): a handful of
objects per job, however many events it has (~1.4 ms a pass for the same thousand jobs).

An event's frame is ``id: <n>\\ndata: <JSON>\\n\\n``, its JSON one line, so the JSON is read back from it.
"""

from __future__ import annotations

from array import array


def sse_frame(event_id: int, data: str) -> bytes:
    """The SSE frame of event ``event_id`` whose JSON text is ``data`` (one line)."""
    return b"id: %d\ndata: %s\n\n" % (event_id, data.encode())


class EventFrames:
    """Append-only SSE frames, each with its event type; the one at index ``i`` has the id
    ``first_id + i`` (1 + i, but for a replayed job's lone terminal event)."""

    __slots__ = ("_blob", "_ends", "_kinds", "_type_names", "first_id")

    def __init__(self, first_id: int = 1) -> None:
        self.first_id = first_id
        self._blob = bytearray()
        self._ends = array("Q")  # offset just past each frame
        self._kinds = array("I")  # each frame's type, as an index into _type_names
        self._type_names: list[str] = []  # the few distinct types of this log, in order seen

    def __len__(self) -> int:
        return len(self._ends)

    def add(self, event_type: str, frame: bytes) -> None:
        try:
            kind = self._type_names.index(event_type)
        except ValueError:
            kind = len(self._type_names)
            self._type_names.append(event_type)
        self._blob += frame
        self._ends.append(len(self._blob))
        self._kinds.append(kind)

    def type_at(self, index: int) -> str:
        return self._type_names[self._kinds[index]]

    def frame_at(self, index: int) -> bytes:
        return self.frames(index, index + 1)

    def data_at(self, index: int) -> str:
        """The JSON text of the event at ``index``."""
        frame = self.frame_at(index)
        return frame[len(b"id: %d\ndata: " % (self.first_id + index)) : -2].decode()

    def frames(self, start: int, stop: int) -> bytes:
        """The frames of the events at ``start`` up to ``stop`` (excluded), in one piece."""
        begin = self._ends[start - 1] if start > 0 else 0
        return bytes(self._blob[begin : self._ends[stop - 1]]) if stop > start else b""

    def last_index_of(self, event_type: str) -> int | None:
        """The index of the latest event of ``event_type``, if any."""
        if event_type not in self._type_names:
            return None
        kind = self._type_names.index(event_type)
        for index in range(len(self._kinds) - 1, -1, -1):
            if self._kinds[index] == kind:
                return index
        return None
