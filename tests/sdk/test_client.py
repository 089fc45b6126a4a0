"""The blocking ``Client`` against a real orchestrator and worker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rbees.protocol import (
    EndEvent,
    QueuedEvent,
    StartedEvent,
    StopReason,
    TaskRequest,
    TokenEvent,
    is_terminal,
)
from rbees.sdk import (
    AuthenticationError,
    Client,
    InvalidRequestError,
    JobNotFoundError,
    ModelNotFoundError,
    RbeesConnectionError,
    WorkerClient,
)
from tests.sdk.cluster import Cluster
from tests.support.procs import free_port


@pytest.fixture
def client(cluster: Cluster) -> Iterator[Client]:
    with Client(cluster.url, api_token=cluster.api_token) as c:
        yield c


def request(cluster: Cluster, **extra: object) -> TaskRequest:
    fields = {"model": cluster.model, "prompt": "Once upon a time", "max_tokens": 24, "seed": 7, **extra}
    return TaskRequest.model_validate(fields)


def test_stream_yields_typed_events_from_queued_to_end(client: Client, cluster: Cluster) -> None:
    stream = client.stream(request(cluster))
    events = list(stream)

    assert isinstance(events[0], QueuedEvent)
    assert isinstance(events[1], StartedEvent) and events[1].seed == 7
    assert isinstance(events[-1], EndEvent)
    assert [e for e in events if is_terminal(e)] == [events[-1]]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert tokens and [t.i for t in tokens] == sorted(t.i for t in tokens)
    assert events[-1].stop_reason in (StopReason.MAX_TOKENS, StopReason.EOS)
    assert stream.job_id == events[0].job_id and stream.finished

    job = client.job(events[0].job_id)
    assert job.status == "completed" and job.tokens_out == events[-1].tokens_out


def test_same_seed_same_text(client: Client, cluster: Cluster) -> None:
    def text() -> str:
        return "".join(
            e.t for e in client.stream(request(cluster, temperature=1.0)) if isinstance(e, TokenEvent)
        )

    assert text() == text()


def test_enqueue_then_follow_resumes_after_last_event_id(client: Client, cluster: Cluster) -> None:
    accepted = client.enqueue(request(cluster))
    assert accepted.job_id.startswith("job-") and accepted.events_url.endswith(f"/{accepted.job_id}/events")

    first = client.events(accepted.job_id)
    head = [next(first) for _ in range(4)]
    resume_from = first.last_event_id
    first.close()
    assert resume_from == "4"

    rest = list(client.events(accepted.job_id, last_event_id=resume_from))
    replay = list(client.events(accepted.job_id))

    assert head + rest == replay
    assert isinstance(replay[-1], EndEvent)


def test_cancel_ends_the_stream_with_cancelled(client: Client, cluster: Cluster) -> None:
    stream = client.stream(request(cluster, max_tokens=256, prompt="1 2 3 4 5"))
    seen = []
    for event in stream:
        seen.append(event)
        if isinstance(event, TokenEvent) and len(seen) == 3:
            client.cancel(event_job(stream))
    end = seen[-1]
    assert isinstance(end, EndEvent) and end.stop_reason is StopReason.CANCELLED
    assert end.tokens_out < 256
    assert client.job(event_job(stream)).status == "cancelled"


def event_job(stream: object) -> str:
    job_id = getattr(stream, "job_id", None)
    assert isinstance(job_id, str)
    return job_id


def test_errors_become_typed_exceptions(client: Client, cluster: Cluster) -> None:
    with pytest.raises(ModelNotFoundError) as missing:
        client.enqueue(request(cluster, model="no-such-model"))
    assert missing.value.code == "MODEL_NOT_FOUND" and missing.value.status == 404
    assert missing.value.retriable is False

    with pytest.raises(ModelNotFoundError):
        list(client.stream(request(cluster, model="no-such-model")))

    with pytest.raises(InvalidRequestError) as invalid:  # a dict skips local validation
        client.enqueue({"model": cluster.model, "prompt": "hi", "temperature": 5})
    assert invalid.value.status == 400 and "temperature" in invalid.value.message

    with pytest.raises(JobNotFoundError):
        client.job("job-does-not-exist")

    with Client(cluster.url) as anonymous, pytest.raises(AuthenticationError) as denied:
        anonymous.workers()
    assert denied.value.status == 401

    with Client(f"http://127.0.0.1:{free_port()}") as nowhere, pytest.raises(RbeesConnectionError):
        nowhere.health()


def test_health_and_workers(client: Client, cluster: Cluster) -> None:
    health = client.health()
    assert health.status == "healthy" and health.workers == 1
    (worker,) = client.workers()
    assert worker.worker_id == cluster.worker_id and worker.model == cluster.model and worker.ready


def test_models_lists_what_workers_serve(client: Client, cluster: Cluster) -> None:
    assert [(m.id, m.ready_workers) for m in client.models()] == [(cluster.model, 1)]


def test_jobs_lists_recent_jobs(client: Client, cluster: Cluster) -> None:
    done = list(client.stream(request(cluster, max_tokens=2)))
    job_id = done[0].job_id if isinstance(done[0], QueuedEvent) else ""
    listed = client.jobs(limit=50)
    assert job_id in [j.job_id for j in listed]


def test_worker_client_executes_directly(cluster: Cluster) -> None:
    with WorkerClient(cluster.worker_url, token=cluster.worker_token) as worker:
        assert worker.health().status == "healthy"
        events = list(worker.execute({"prompt": "Hello", "max_tokens": 5, "seed": 1}))
    assert isinstance(events[0], StartedEvent)
    assert isinstance(events[-1], EndEvent) and events[-1].tokens_out <= 5

    with WorkerClient(cluster.worker_url) as anonymous, pytest.raises(AuthenticationError):
        list(anonymous.execute({"prompt": "Hello", "max_tokens": 5}))
