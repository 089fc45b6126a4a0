"""A job's event log keeps its events out of the garbage collector's sight, and reads them back exactly."""

from __future__ import annotations

import gc
import json

from rbees.orchestrator.event_frames import EventFrames, sse_frame
from rbees.orchestrator.jobs import EventLog, Job
from rbees.orchestrator.registry import JobRecord
from rbees.protocol import StopReason, TaskRequest


def _token(i: int) -> str:
    return json.dumps({"type": "token", "t": f" w{i} \u00e9\\n", "i": i}, separators=(",", ":"))


def test_frames_read_back_each_event_and_any_run_of_them() -> None:
    frames = EventFrames()
    data = ['{"type":"queued"}', _token(0), _token(1), '{"type":"end","tokens_out":2}']
    types = ["queued", "token", "token", "end"]
    for n, (kind, text) in enumerate(zip(types, data, strict=True), start=1):
        frames.add(kind, sse_frame(n, text))
    assert len(frames) == 4
    assert [frames.type_at(i) for i in range(4)] == types
    assert [frames.data_at(i) for i in range(4)] == data
    assert frames.frame_at(1) == b"id: 2\ndata: " + data[1].encode() + b"\n\n"
    assert frames.frames(1, 3) == frames.frame_at(1) + frames.frame_at(2)
    assert frames.frames(2, 2) == b""
    assert frames.last_index_of("token") == 2
    assert frames.last_index_of("error") is None


def test_frames_numbered_from_a_later_id() -> None:
    frames = EventFrames(first_id=13)
    frames.add("end", sse_frame(13, '{"type":"end"}'))
    assert frames.data_at(0) == '{"type":"end"}'


def test_a_long_log_adds_no_object_the_collector_tracks() -> None:
    job = Job("job-1", TaskRequest(model="tiny", prompt="hi"))
    job.append("queued", '{"type":"queued"}')
    job.append("token", _token(0))
    gc.collect()
    before = len(gc.get_objects())
    for i in range(1, 2000):
        job.append("token", _token(i))
    job.end(StopReason.MAX_TOKENS)
    gc.collect()
    assert len(gc.get_objects()) - before < 20  # not one (or more) per event
    events = job.log.events
    assert [e.id for e in events] == list(range(1, 2003))
    assert events[-2].data == _token(1999) and events[-1].type == "end"
    assert job.tokens_so_far() == 2000


def test_a_replayed_log_numbers_its_one_event_after_what_the_client_saw() -> None:
    rec = JobRecord("job-5", "tiny", "interactive", "completed", stop_reason="EOS", tokens_out=3)
    log = EventLog.replay_of(rec, after_id=12)
    (event,) = log.events
    assert (event.id, event.type) == (13, "end")
    assert event.frame.startswith(b"id: 13\ndata: ") and json.loads(event.data)["tokens_out"] == 3
    assert log.frames_after(0) == (event.frame, 1, True)
