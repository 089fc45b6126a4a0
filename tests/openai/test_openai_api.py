"""The official ``openai`` package against ``/v1`` of a real ``rbees-orcd`` with a real worker."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest

import openai
from rbees.sdk import Client, JobInfo
from tests.sdk.cluster import Cluster

USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def oa(openai_cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{openai_cluster.url}/v1", api_key=openai_cluster.api_token) as client:
        yield client


@pytest.fixture
async def aoa(openai_cluster: Cluster) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{openai_cluster.url}/v1", api_key=openai_cluster.api_token) as c:
        yield c


@pytest.fixture
def rb(openai_cluster: Cluster) -> Iterator[Client]:
    with Client(openai_cluster.url, api_token=openai_cluster.api_token) as client:
        yield client


def job_of(completion_id: str) -> str:
    return completion_id.split("-", 1)[1]


def wait_status(rb: Client, job_id: str, wanted: str, timeout: float = 15.0) -> JobInfo:
    deadline = time.monotonic() + timeout
    while True:
        job = rb.job(job_id)
        if job.status == wanted or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_models(oa: openai.OpenAI) -> None:
    models = oa.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].owned_by == "rbees"
    assert oa.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("nope")


def test_chat_completion(oa: openai.OpenAI, rb: Client) -> None:
    reply = oa.chat.completions.create(model="tiny", messages=USER, max_tokens=6, seed=4, temperature=0.9)
    again = oa.chat.completions.create(
        model="tiny", messages=USER, max_completion_tokens=6, seed=4, temperature=0.9
    )

    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert choice.message.role == "assistant" and choice.message.content == again.choices[0].message.content
    assert choice.finish_reason in ("length", "stop")
    assert (
        reply.usage is not None and 0 < reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    )
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    job = rb.job(job_of(reply.id))  # the same job the /v2 API sees
    assert job.status == "completed" and job.tokens_out == reply.usage.completion_tokens


def test_finish_reason_length_and_stop(oa: openai.OpenAI) -> None:
    long = oa.completions.create(model="tiny", prompt="1 2 3", max_tokens=3, seed=1)
    assert long.choices[0].finish_reason == "length" and long.usage and long.usage.completion_tokens == 3

    free = oa.completions.create(model="tiny", prompt="1 2 3", max_tokens=40, seed=1, temperature=0)
    stop = free.choices[0].text[3:6] or free.choices[0].text[:2]
    stopped = oa.completions.create(
        model="tiny", prompt="1 2 3", max_tokens=40, seed=1, temperature=0, stop=stop
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text and free.choices[0].text.startswith(stopped.choices[0].text)


def test_completion_echo_and_list_stop(oa: openai.OpenAI) -> None:
    done = oa.completions.create(model="tiny", prompt="Once", max_tokens=4, echo=True, stop=["zzz", "qqq"])
    assert done.object == "text_completion" and done.choices[0].text.startswith("Once")


def test_streaming_chat(oa: openai.OpenAI) -> None:
    chunks = list(
        oa.chat.completions.create(
            model="tiny",
            messages=USER,
            max_tokens=5,
            seed=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = oa.chat.completions.create(model="tiny", messages=USER, max_tokens=5, seed=2)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == (whole.usage.completion_tokens if whole.usage else -1)


def test_streaming_completion(oa: openai.OpenAI) -> None:
    chunks = list(oa.completions.create(model="tiny", prompt="Hi", max_tokens=4, stream=True, seed=9))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert (
        "".join(c.choices[0].text for c in chunks)
        == oa.completions.create(model="tiny", prompt="Hi", max_tokens=4, seed=9).choices[0].text
    )


async def test_async_client_streaming_and_not(aoa: openai.AsyncOpenAI) -> None:
    stream = await aoa.chat.completions.create(model="tiny", messages=USER, max_tokens=4, seed=5, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    whole = await aoa.chat.completions.create(model="tiny", messages=USER, max_tokens=4, seed=5)
    assert text == whole.choices[0].message.content
    legacy = await aoa.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    assert legacy.usage is not None and legacy.usage.completion_tokens <= 2


def test_errors_in_openai_shape(oa: openai.OpenAI, openai_cluster: Cluster) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oa.chat.completions.create(model="nope", messages=USER)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"

    with pytest.raises(openai.BadRequestError) as many:
        oa.chat.completions.create(model="tiny", messages=USER, n=2)
    assert many.value.param == "n"

    with pytest.raises(openai.BadRequestError) as hot:
        oa.chat.completions.create(model="tiny", messages=USER, temperature=3)
    assert hot.value.param == "temperature" and hot.value.type == "invalid_request_error"

    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model="tiny", prompt="x", seed=-1)

    wrong = openai.OpenAI(base_url=f"{openai_cluster.url}/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError) as denied:  # as OpenAI answers a wrong key: 401
        wrong.models.list()
    assert denied.value.status_code == 401

    headers = {"Authorization": f"Bearer {openai_cluster.api_token}", "Content-Type": "application/json"}
    broken = urllib.request.Request(f"{openai_cluster.url}/v1/chat/completions", b"{", headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(broken, timeout=10)
    assert raw.value.code == 400
    assert set(json.loads(raw.value.read())["error"]) == {"message", "type", "param", "code"}


def test_closing_a_stream_cancels_its_job(oa: openai.OpenAI, rb: Client) -> None:
    stream = oa.chat.completions.create(
        model="tiny", messages=USER, max_tokens=240, temperature=0, stream=True
    )
    first = next(iter(stream))
    stream.close()
    assert wait_status(rb, job_of(first.id), "cancelled").status == "cancelled"


def test_client_timeout_cancels_a_waiting_job(oa: openai.OpenAI, rb: Client, openai_cluster: Cluster) -> None:
    # Greedy: the tiny model runs these to max_tokens (no early EOS), so the one slot stays taken.
    hold = {"model": "tiny", "prompt": "1 2 3", "max_tokens": 240, "temperature": 0}
    busy = [rb.enqueue(hold).job_id for _ in range(2)]
    impatient = oa.with_options(timeout=0.3, max_retries=0)
    try:
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model="tiny", prompt="late", max_tokens=8)
        holder = rb.job(busy[0])
        assert holder.status in ("running", "completed") and holder.attempts == 1, holder
        time.sleep(0.5)
        ours = next(j for j in rb.jobs(limit=5) if j.job_id not in busy)  # the newest
        assert wait_status(rb, ours.job_id, "cancelled").status == "cancelled"
    finally:
        for job_id in busy:
            rb.cancel(job_id)


def test_a_job_cancelled_elsewhere_ends_the_stream_with_an_error(
    oa: openai.OpenAI, rb: Client, openai_cluster: Cluster
) -> None:
    stream = oa.chat.completions.create(
        model="tiny", messages=USER, max_tokens=240, temperature=0, stream=True
    )
    chunks = iter(stream)
    first = next(chunks)
    # The tiny model makes 240 tokens in about half a second: hold the worker while the cancel goes
    # out, so it lands mid-job however slow the machine is (the worker reads it once it goes on).
    openai_cluster.worker.signal(signal.SIGSTOP)
    try:
        assert rb.cancel(job_of(first.id))["status"] == "running"
        time.sleep(0.2)
    finally:
        openai_cluster.worker.signal(signal.SIGCONT)
    with pytest.raises(openai.APIError) as failed:
        for _ in chunks:
            pass
    assert "cancelled" in failed.value.message
