"""A real ``rbees-workerd`` on the tiny Llama model: streaming, sampling, stop, cancel, slots, 400s."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from rbees.protocol import SSEParser
from tests.worker.helpers import EventStream, Worker, execute, request, run_worker, terminal, text_of

SLOTS = 2
LONG = 200  # tokens; the tiny model's context is 256


@pytest.fixture(scope="module")
def worker(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    home = tmp_path_factory.mktemp("worker-home")
    with run_worker(tiny_llama, home, "--slots", str(SLOTS), worker_id="w-http") as w:
        yield w


def _health(worker: Worker) -> dict[str, Any]:
    status, _, body = request(f"{worker.url}/health")
    assert status == 200
    return dict(body)


def _wait_idle(worker: Worker, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _health(worker)["slots_busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _health(worker)["slots_busy"] == 0


def _first(stream: EventStream, kind: str) -> dict[str, Any]:
    for event in stream:
        if event["type"] == kind:
            return event
        assert event["type"] in ("started", "token"), event
    raise AssertionError(f"stream ended before a {kind} event")


def test_health_reports_the_loaded_model(worker: Worker) -> None:
    health = _health(worker)
    assert health["status"] == "healthy"
    assert health["worker_id"] == "w-http"
    assert health["model"] == "tiny-llama"
    assert (health["backend"], health["device"]) == ("cpu", "cpu")
    assert health["vram_bytes"] > 0
    assert (health["slots_total"], health["slots_busy"]) == (SLOTS, 0)
    assert health["uptime_s"] > 0
    assert health["context_length"] == 256


def test_stream_is_started_tokens_metrics_end_in_exact_sse_framing(worker: Worker) -> None:
    with EventStream(
        worker, {"job_id": "frame-1", "prompt": "Hello, how are you?", "max_tokens": 8, "seed": 3}
    ) as s:
        assert s.status == 200
        assert s.resp.getheader("content-type", "").startswith("text/event-stream")
        events = list(s)
        body = b"".join(s.raw_frames)
    assert re.fullmatch(rb"(data: \{[^\n]*\}\n\n)+", body), body
    started, tokens, metrics, end = events[0], events[1:-2], events[-2], terminal(events)
    assert started["type"] == "started"
    assert started["job_id"] == "frame-1" and started["model"] == "tiny-llama"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", started["started_at"])
    assert started["seed"] == 3 and started["tokens_in"] > 0
    assert [t["i"] for t in tokens] == list(range(len(tokens)))
    assert all(t["type"] == "token" and t["t"] for t in tokens)
    assert end["type"] == "end" and end["stop_reason"] == "MAX_TOKENS"
    assert end["tokens_out"] == 8 and end["tokens_in"] == started["tokens_in"]
    assert isinstance(end["decode_time_ms"], int)
    assert metrics["type"] == "metrics" and metrics["tokens_out"] == 8
    assert metrics["tokens_per_second"] > 0
    assert metrics["extra"]["tokens_in"] == started["tokens_in"]
    assert 0 <= metrics["extra"]["first_token_ms"] <= end["decode_time_ms"]


def _thread_nices(pid: int) -> dict[int, int]:
    """Each thread's nice value, from /proc (field 19 of ``stat``, counted after the command name)."""
    nices = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rpartition(")")[2].split()
        nices[int(task.name)] = int(fields[16])
    return nices


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_the_decode_thread_runs_below_the_event_loop(worker: Worker) -> None:
    with EventStream(worker, {"job_id": "nice-1", "prompt": "Hi", "max_tokens": 2}) as s:
        assert terminal(list(s))["type"] == "end"
    nices = _thread_nices(worker.proc.pid)
    loop_nice = nices.pop(worker.proc.pid)  # the main thread runs the event loop
    assert min(19, loop_nice + 5) in nices.values(), nices  # the decode thread: --decode-nice 5


def test_a_slow_reader_and_a_kept_alive_connection_get_whole_streams(worker: Worker) -> None:
    """Tokens are written to the socket by the decode thread: a client that reads nothing for a
    while, then everything, gets every frame in order, and the connection serves the next job."""
    parts = urlsplit(worker.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    try:
        for n in range(2):
            body = {"job_id": f"slow-{n}", "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0}
            conn.request("POST", "/execute", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            time.sleep(0.5)  # the job runs on while nothing is read
            events = [json.loads(m.data) for m in SSEParser().feed(resp.read())]
            tokens = [e for e in events if e["type"] == "token"]
            assert events[0]["type"] == "started"
            assert [t["i"] for t in tokens] == list(range(len(tokens)))
            assert terminal(events)["tokens_out"] == LONG
    finally:
        conn.close()


def test_every_sampling_parameter_is_honoured_and_seeded(worker: Worker) -> None:
    params = {
        "prompt": "Once upon a time",
        "max_tokens": 24,
        "temperature": 1.3,
        "top_p": 0.95,
        "top_k": 100,
        "min_p": 0.01,
        "repetition_penalty": 1.3,
    }
    a = execute(worker, job_id="seed-a", seed=42, **params)
    b = execute(worker, job_id="seed-b", seed=42, **params)
    c = execute(worker, job_id="seed-c", seed=43, **params)
    assert text_of(a) == text_of(b) and text_of(a)
    assert text_of(a) != text_of(c)
    assert terminal(a)["tokens_out"] == terminal(b)["tokens_out"]


def test_missing_seed_is_random_and_reported_so_it_replays(worker: Worker) -> None:
    params = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0}
    first = execute(worker, job_id="noseed-1", **params)
    second = execute(worker, job_id="noseed-2", **params)
    seed = first[0]["seed"]
    assert isinstance(seed, int) and seed != second[0]["seed"]
    replay = execute(worker, job_id="noseed-3", seed=seed, **params)
    assert text_of(replay) == text_of(first)


def test_temperature_zero_is_greedy_whatever_the_seed(worker: Worker) -> None:
    a = execute(
        worker, job_id="greedy-1", prompt="The capital of France", max_tokens=20, temperature=0, seed=1
    )
    b = execute(
        worker, job_id="greedy-2", prompt="The capital of France", max_tokens=20, temperature=0, seed=2
    )
    assert text_of(a) == text_of(b) and terminal(a)["tokens_out"] == 20


def test_stop_sequence_ends_generation_without_emitting_it(worker: Worker) -> None:
    base = {"prompt": "Hello, how are you?", "max_tokens": 40, "temperature": 0}
    full = text_of(execute(worker, job_id="stop-ref", **base))
    at = next(k for k in range(6, len(full) - 3) if full.find(full[k : k + 3]) == k)
    stop = full[at : at + 3]
    events = execute(worker, job_id="stop-1", stop=["never-appears-xyz", stop], **base)
    end = terminal(events)
    assert end["stop_reason"] == "STOP_SEQUENCE"
    assert end["stop_sequence_matched"] == stop
    assert text_of(events) == full[:at]
    assert stop not in text_of(events)


def test_chat_messages_are_rendered_with_the_chat_template(worker: Worker) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = execute(worker, job_id="chat-1", messages=messages, max_tokens=4)
    plain = execute(worker, job_id="chat-2", prompt="Hi", max_tokens=4)
    assert chat[0]["tokens_in"] > plain[0]["tokens_in"]
    assert terminal(chat)["type"] == "end"


def test_cancel_stops_a_streaming_job_and_frees_its_slot(worker: Worker) -> None:
    with EventStream(
        worker, {"job_id": "cancel-1", "prompt": "Once", "max_tokens": LONG, "temperature": 0}
    ) as s:
        _first(s, "token")  # a token arrived while the job still runs: tokens stream as generated
        status, _, body = request(f"{worker.url}/cancel", "POST", {"job_id": "cancel-1"})
        assert (status, body["cancelled"]) == (202, True)
        rest = list(s)
    end = terminal(rest)
    assert end["stop_reason"] == "CANCELLED" and end["tokens_out"] < LONG
    assert request(f"{worker.url}/cancel", "POST", {"job_id": "cancel-1"})[0] == 202
    _wait_idle(worker)


def test_cancel_of_an_unknown_job_is_accepted(worker: Worker) -> None:
    status, _, body = request(f"{worker.url}/cancel", "POST", {"job_id": "never-ran"})
    assert status == 202 and body["cancelled"] is False


def test_client_disconnect_cancels_the_job_and_frees_the_slot(worker: Worker) -> None:
    s = EventStream(worker, {"job_id": "gone-1", "prompt": "Once", "max_tokens": LONG, "temperature": 0})
    _first(s, "token")
    s.close()
    _wait_idle(worker)
    deadline = time.monotonic() + 5
    while "job gone-1 ended: CANCELLED" not in worker.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "job gone-1 ended: CANCELLED" in worker.log.read_text()
    assert terminal(execute(worker, job_id="after-gone", prompt="Hi", max_tokens=2))["type"] == "end"


def test_one_request_more_than_slots_gets_503_with_retry_after(worker: Worker) -> None:
    streams = [
        EventStream(worker, {"job_id": f"slot-{n}", "prompt": "Once", "max_tokens": LONG, "temperature": 0})
        for n in range(SLOTS)
    ]
    try:
        for s in streams:
            _first(s, "token")
        assert _health(worker)["slots_busy"] == SLOTS
        status, headers, body = request(f"{worker.url}/execute", "POST", {"job_id": "slot-x", "prompt": "Hi"})
        assert status == 503
        assert body["error"]["code"] == "ALL_SLOTS_BUSY" and body["error"]["retriable"] is True
        assert int(headers["retry-after"]) >= 1
    finally:
        for n, s in enumerate(streams):
            request(f"{worker.url}/cancel", "POST", {"job_id": f"slot-{n}"})
            s.close()
    _wait_idle(worker)


def test_duplicate_running_job_id_is_a_400(worker: Worker) -> None:
    with EventStream(
        worker, {"job_id": "dup-1", "prompt": "Once", "max_tokens": LONG, "temperature": 0}
    ) as s:
        _first(s, "token")
        status, _, body = request(f"{worker.url}/execute", "POST", {"job_id": "dup-1", "prompt": "Hi"})
        request(f"{worker.url}/cancel", "POST", {"job_id": "dup-1"})
    assert status == 400 and body["error"]["code"] == "INVALID_REQUEST"
    assert body["error"]["details"]["reason"] == "duplicate_job_id"
    _wait_idle(worker)


def test_prompt_longer_than_the_context_is_context_length_exceeded(worker: Worker) -> None:
    status, _, body = request(
        f"{worker.url}/execute", "POST", {"job_id": "long-1", "prompt": "1 2 3 4 5 6 7 8 9 10 " * 60}
    )
    assert status == 400
    assert body["error"]["code"] == "CONTEXT_LENGTH_EXCEEDED"
    assert body["error"]["details"]["context_length"] == 256
    assert body["error"]["details"]["prompt_tokens"] >= 256


OK = {"job_id": "bad-1", "prompt": "Hi"}
BAD_BODIES: list[tuple[str, Any]] = [
    ("missing prompt", {"job_id": "bad-1"}),
    ("empty prompt", {**OK, "prompt": ""}),
    ("blank prompt", {**OK, "prompt": "   "}),
    ("prompt and messages", {**OK, "messages": [{"role": "user", "content": "x"}]}),
    ("empty messages", {"job_id": "bad-1", "messages": []}),
    ("bad role", {"job_id": "bad-1", "messages": [{"role": "wizard", "content": "x"}]}),
    ("zero max_tokens", {**OK, "max_tokens": 0}),
    ("negative max_tokens", {**OK, "max_tokens": -5}),
    ("huge max_tokens", {**OK, "max_tokens": 10**9}),
    ("fractional max_tokens", {**OK, "max_tokens": 1.5}),
    ("string max_tokens", {**OK, "max_tokens": "10"}),
    ("negative temperature", {**OK, "temperature": -0.1}),
    ("huge temperature", {**OK, "temperature": 50}),
    ("zero top_p", {**OK, "top_p": 0}),
    ("top_p above one", {**OK, "top_p": 1.5}),
    ("negative top_k", {**OK, "top_k": -1}),
    ("min_p above one", {**OK, "min_p": 2}),
    ("zero repetition_penalty", {**OK, "repetition_penalty": 0}),
    ("too many stops", {**OK, "stop": [f"s{n}" for n in range(17)]}),
    ("too long stop", {**OK, "stop": ["x" * 257]}),
    ("empty stop", {**OK, "stop": [""]}),
    ("stop not a list", {**OK, "stop": "END"}),
    ("negative seed", {**OK, "seed": -1}),
    ("unknown field", {**OK, "stream": True}),
    ("missing job_id", {"prompt": "Hi"}),
    ("bad job_id", {**OK, "job_id": "a b/c"}),
    ("array body", [OK]),
]


@pytest.mark.parametrize(("case", "body"), BAD_BODIES, ids=[c for c, _ in BAD_BODIES])
def test_bad_input_is_a_400_envelope(worker: Worker, case: str, body: Any) -> None:
    status, _, payload = request(f"{worker.url}/execute", "POST", body)
    assert status == 400, (case, payload)
    assert payload["error"]["code"] == "INVALID_REQUEST"
    assert payload["error"]["message"] and payload["error"]["retriable"] is False


@pytest.mark.parametrize(
    "raw",
    [
        b'{"job_id": "bad-1", "prompt": "Hi", "temperature": NaN}',
        b'{"job_id": "bad-1", "prompt": "Hi", "top_p": Infinity}',
        b'{"job_id": "bad-1", "prompt": ',
        b"",
        b"\xff\xfe not utf-8",
        b'{"job_id": "bad-1", "prompt": "Hi", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"job_id": "bad-1", "prompt": "Hi", "seed": ' + b"9" * 5000 + b"}",
    ],
    ids=["nan temperature", "infinite top_p", "truncated json", "empty body", "not utf-8", "deep", "big int"],
)
def test_invalid_json_and_non_finite_numbers_are_400(worker: Worker, raw: bytes) -> None:
    for route in ("/execute", "/cancel"):
        status, _, payload = request(f"{worker.url}{route}", "POST", raw=raw)
        assert status == 400 and payload["error"]["code"] == "INVALID_REQUEST", (route, payload)


def test_bad_cancel_body_is_400_and_unknown_route_is_404(worker: Worker) -> None:
    status, _, payload = request(f"{worker.url}/cancel", "POST", {"id": "x"})
    assert status == 400 and payload["error"]["code"] == "INVALID_REQUEST"
    status, _, payload = request(f"{worker.url}/nope")
    assert status == 404 and payload["error"]["code"] == "NOT_FOUND"


def test_form_encoded_json_body_is_accepted_like_curl_d(worker: Worker) -> None:
    status, _, payload = request(
        f"{worker.url}/execute",
        "POST",
        raw=b'{"job_id": "curl-1", "prompt": "Hi", "max_tokens": 2}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 200 and '"type":"end"' in payload


def test_oversized_body_is_a_400(worker: Worker) -> None:
    status, _, payload = request(
        f"{worker.url}/execute", "POST", {"job_id": "big-1", "prompt": "x" * 17_000_000}
    )
    assert status == 400 and payload["error"]["details"]["max_body_bytes"] == 16 * 1024 * 1024
