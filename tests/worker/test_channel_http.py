"""A real worker's event channel (``POST /channel``): jobs sent to it, their lines, cancel, loss, drain."""

from __future__ import annotations

import http.client
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.worker.helpers import Worker, execute, request, run_worker, terminal

LONG = 200  # tokens; the tiny model's context is 256


class ChannelReader:
    """An open channel: its id, then ``(job_id, event)`` per line as they come."""

    def __init__(self, worker: Worker) -> None:
        parts = urlsplit(worker.url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        self.conn.request("POST", "/channel", headers=worker.headers())
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.content_type = self.resp.getheader("content-type", "")
        self.id = json.loads(self.resp.readline())["channel_id"] if self.status == 200 else None

    def lines(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while True:
            line = self.resp.readline()
            if not line:
                return
            job_id, _, data = line.rstrip(b"\n").partition(b" ")
            yield job_id.decode(), json.loads(data)

    def until_ended(self, *job_ids: str) -> dict[str, list[dict[str, Any]]]:
        events: dict[str, list[dict[str, Any]]] = {job_id: [] for job_id in job_ids}
        open_jobs = set(job_ids)
        for job_id, event in self.lines():
            events.setdefault(job_id, []).append(event)
            if event["type"] in ("end", "error"):
                open_jobs.discard(job_id)
                if not open_jobs:
                    return events
        raise AssertionError(f"the channel ended before {sorted(open_jobs)} did: {events}")

    def close(self) -> None:
        self.resp.close()
        self.conn.close()


def send(worker: Worker, channel: str, **body: Any) -> tuple[int, Any]:
    status, _, payload = request(
        f"{worker.url}/execute", "POST", body, headers={"X-Rbees-Channel": channel, **worker.headers()}
    )
    return status, payload


def _busy(worker: Worker) -> int:
    return int(request(f"{worker.url}/health")[2]["slots_busy"])


def _wait_idle(worker: Worker, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _busy(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _busy(worker) == 0


@pytest.fixture(scope="module")
def worker(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    home = tmp_path_factory.mktemp("channel-home")
    with run_worker(tiny_llama, home, "--slots", "3", worker_id="w-chan", token="chan-secret") as w:
        yield w


def test_jobs_on_a_channel_are_acknowledged_and_their_events_come_on_it_in_order(worker: Worker) -> None:
    channel = ChannelReader(worker)
    try:
        assert channel.status == 200 and channel.content_type == "application/x-rbees-channel"
        assert channel.id
        bodies = {
            f"ch-{n}": {"prompt": f"Once upon a time {n}", "max_tokens": 12, "temperature": 0.8, "seed": n}
            for n in range(3)
        }
        for job_id, body in bodies.items():
            assert send(worker, channel.id, job_id=job_id, **body) == (
                202,
                {"job_id": job_id, "channel_id": channel.id},
            )
        got = channel.until_ended(*bodies)
    finally:
        channel.close()
    for job_id, body in bodies.items():
        events = got[job_id]
        assert events[0]["type"] == "started" and events[0]["job_id"] == job_id
        assert events[0]["seed"] == body["seed"]
        end = terminal(events)
        assert end["type"] == "end" and end["stop_reason"] == "MAX_TOKENS"
        # The same job on its own stream gives the same events (seeded), whatever shared the channel.
        alone = execute(worker, job_id=f"{job_id}-alone", **body)
        assert [e for e in events if e["type"] == "token"] == [e for e in alone if e["type"] == "token"]
        assert [e["type"] for e in events[1:]] == [e["type"] for e in alone[1:]]
    _wait_idle(worker)


def test_a_channel_needs_the_token_and_a_job_needs_an_open_channel(worker: Worker) -> None:
    status, _, body = request(f"{worker.url}/channel", "POST")
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
    status, body = send(worker, "no-such-channel", job_id="orphan", prompt="Hi", max_tokens=2)
    assert status == 409 and body["error"]["code"] == "CONFLICT"
    channel = ChannelReader(worker)
    channel_id = channel.id
    assert channel_id
    channel.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the worker notices the reader is gone
        status, body = send(worker, channel_id, job_id="late", prompt="Hi", max_tokens=2)
        if status == 409:
            break
        time.sleep(0.05)
    assert status == 409
    # Bad input is refused as on a stream, and takes no slot.
    channel = ChannelReader(worker)
    try:
        assert channel.id
        status, body = send(worker, channel.id, job_id="bad", prompt="Hi", max_tokens=-1)
        assert status == 400 and body["error"]["code"] == "INVALID_REQUEST"
    finally:
        channel.close()
    _wait_idle(worker)


def test_cancel_reaches_a_job_on_a_channel(worker: Worker) -> None:
    channel = ChannelReader(worker)
    try:
        assert channel.id
        assert send(worker, channel.id, job_id="ch-cancel", prompt="Once", max_tokens=LONG)[0] == 202
        seen: list[dict[str, Any]] = []
        for job_id, event in channel.lines():
            assert job_id == "ch-cancel"
            seen.append(event)
            if event["type"] == "token":
                break
        status, _, body = request(
            f"{worker.url}/cancel", "POST", {"job_id": "ch-cancel"}, headers=worker.headers()
        )
        assert (status, body["cancelled"]) == (202, True)
        events = seen + channel.until_ended("ch-cancel")["ch-cancel"]
    finally:
        channel.close()
    end = terminal(events)
    assert end["stop_reason"] == "CANCELLED" and end["tokens_out"] < LONG
    _wait_idle(worker)


def test_a_channel_whose_reader_goes_away_cancels_its_jobs_and_frees_their_slots(worker: Worker) -> None:
    channel = ChannelReader(worker)
    assert channel.id
    for n in range(2):
        assert send(worker, channel.id, job_id=f"ch-gone-{n}", prompt="Once", max_tokens=LONG)[0] == 202
    for _, event in channel.lines():
        if event["type"] == "token":
            break
    assert _busy(worker) == 2
    channel.close()
    _wait_idle(worker)
    log = worker.log.read_text()
    assert "job ch-gone-0 ended: CANCELLED" in log and "job ch-gone-1 ended: CANCELLED" in log


def test_a_stopping_worker_ends_its_channels_once_its_jobs_are_done(tiny_llama: Path, tmp_path: Path) -> None:
    with run_worker(tiny_llama, tmp_path, "--slots", "2", worker_id="w-chan-stop") as worker:
        channel = ChannelReader(worker)
        assert channel.id
        assert send(worker, channel.id, job_id="last", prompt="Once", max_tokens=40, seed=1)[0] == 202
        started = time.monotonic()
        worker.proc.signal(signal.SIGTERM)
        events = channel.until_ended("last")["last"]
        end = terminal(events)  # it ran to its end (seeded: an EOS drawn by chance once failed this)
        assert end["type"] == "end" and end["stop_reason"] == "MAX_TOKENS"
        assert list(channel.lines()) == []  # then the channel's answer ends
        assert worker.proc.wait(20) == 0
        assert time.monotonic() - started < 10  # the open channel did not hold the server up
        channel.close()
