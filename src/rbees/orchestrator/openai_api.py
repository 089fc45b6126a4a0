"""The OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

A thin translation layer over :class:`JobService`: every request becomes a ``TaskRequest`` and goes
through the same admission, queue, scheduling, retries, timeouts and cancellation as ``/v2/tasks``.
A client that disconnects cancels its job. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``, also inside a stream (which the ``openai``
package raises as ``APIError``).

Mapping: ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``stop`` (string or
list), ``seed`` pass through; ``n`` must be 1; ``user`` is accepted and not used. As extensions, ``top_k``,
``min_p``, ``repetition_penalty`` and ``priority`` (``interactive`` | ``batch``) pass through too.
``finish_reason`` is ``length`` for MAX_TOKENS and ``stop`` for EOS and STOP_SEQUENCE; a cancelled or
failed job is an error. Unset parameters take rbees' defaults (temperature 0.7; 128 tokens for chat,
16 for legacy completions as in OpenAI's API).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.types import Receive

from rbees.httpd import EventStreamResponse
from rbees.orchestrator.fleet import ModelSummary
from rbees.orchestrator.http import limited_body, require_client, service
from rbees.orchestrator.jobs import Job
from rbees.orchestrator.service import JobService
from rbees.protocol import (
    ERROR_STATUS,
    EndEvent,
    ErrorCode,
    ErrorEvent,
    Priority,
    RbeesError,
    StartedEvent,
    StopReason,
    TaskRequest,
    TokenEvent,
)

OWNER = "rbees"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# --- errors in OpenAI's shape ---------------------------------------------------------------------------

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPE_BY_STATUS.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def of(cls, exc: RbeesError) -> OpenAIError:
        param = "model" if exc.code is ErrorCode.MODEL_NOT_FOUND else None
        return cls(exc.status, exc.message, code=exc.code.value.lower(), param=param, headers=exc.headers())

    @classmethod
    def of_event(cls, event: ErrorEvent) -> OpenAIError:
        return cls(ERROR_STATUS.get(event.code, 500), event.message, code=event.code.value.lower())

    @classmethod
    def invalid(cls, exc: ValidationError) -> OpenAIError:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if not isinstance(p, int)]
        param = loc[0] if loc else None
        where = ".".join(loc)
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg"))
        return cls(400, message, code="invalid_value", param=param)


def _unsupported(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, code="unsupported_value", param=param)


# --- request bodies -------------------------------------------------------------------------------------


class _Body(BaseModel):
    # Strict like /v2: "stream": "yes" or "max_tokens": "2" is a mistake to report, not to guess at.
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class _StreamOptions(_Body):
    include_usage: bool = False


class _ContentPart(_Body):
    type: str
    text: str | None = None


class _Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[_ContentPart] | None = None


class _Common(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = None
    # rbees extensions (sent by the openai package through ``extra_body``)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    priority: Priority | None = None

    def task_fields(self, max_tokens: int | None) -> dict[str, Any]:
        if self.n not in (None, 1):
            raise _unsupported("n", "only n=1 is supported")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": stop,
            "seed": self.seed,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "priority": self.priority,
        }

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Common):
    messages: list[_Message]
    max_completion_tokens: int | None = None

    def task(self) -> TaskRequest:
        messages = [_chat_message(i, m) for i, m in enumerate(self.messages)]
        limit = self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        fields = self.task_fields(limit)
        return _task({**fields, "messages": messages})


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise _unsupported("prompt", "give one prompt (a string, or a list of one string)")
        return self.prompt[0]

    def task(self) -> TaskRequest:
        if self.suffix:
            raise _unsupported("suffix", "suffix (insertion) is not supported")
        limit = COMPLETIONS_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        fields = self.task_fields(limit)
        return _task({**fields, "prompt": self.text})


def _chat_message(index: int, message: _Message) -> dict[str, str]:
    role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
    content = message.content
    if content is None:
        return {"role": role, "content": ""}
    if isinstance(content, str):
        return {"role": role, "content": content}
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise _unsupported(
                f"messages[{index}].content", f"content parts of type {part.type!r} are not supported"
            )
        texts.append(part.text)
    return {"role": role, "content": "".join(texts)}


def _task(fields: dict[str, Any]) -> TaskRequest:
    try:
        return TaskRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise OpenAIError.invalid(exc) from None


# --- what a job ended with ------------------------------------------------------------------------------


def finish_reason(end: EndEvent) -> str:
    """OpenAI's ``finish_reason`` for a job's end; a cancelled or failed job is an error."""
    if end.stop_reason is StopReason.MAX_TOKENS:
        return "length"
    if end.stop_reason in (StopReason.EOS, StopReason.STOP_SEQUENCE):
        return "stop"
    if end.stop_reason is StopReason.CANCELLED:
        raise OpenAIError(ERROR_STATUS[ErrorCode.CANCELLED], "the job was cancelled", code="cancelled")
    raise OpenAIError(500, "the job ended with an error", code="internal")


def _usage(tokens_in: int | None, tokens_out: int) -> dict[str, int]:
    prompt = tokens_in or 0
    return {"prompt_tokens": prompt, "completion_tokens": tokens_out, "total_tokens": prompt + tokens_out}


@dataclass(frozen=True)
class _Finished:
    text: str
    finish_reason: str
    usage: dict[str, int]


async def _collect(job: Job) -> _Finished:
    """Run a job to its end; raise its error (or its cancellation) as an ``OpenAIError``."""
    text, tokens_in = "", None
    async for record in job.events():
        event = record.parse()
        if isinstance(event, StartedEvent):
            tokens_in = event.tokens_in
        elif isinstance(event, TokenEvent):
            text += event.t
        elif isinstance(event, EndEvent):
            used = _usage(event.tokens_in if event.tokens_in is not None else tokens_in, event.tokens_out)
            return _Finished(text, finish_reason(event), used)
        elif isinstance(event, ErrorEvent):
            raise OpenAIError.of_event(event)
    raise OpenAIError(500, "the job ended without a result", code="internal")


# --- response shapes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """Where chat and legacy completions differ."""

    chat: bool
    id_prefix: str
    object: str
    chunk_object: str

    def choice(self, text: str, finish: str | None, *, chunk: bool, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if not chunk:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        delta: dict[str, str] = {"role": "assistant", "content": text} if first else {"content": text}
        if finish is not None:
            delta = {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


CHAT = _Shape(
    chat=True, id_prefix="chatcmpl-", object="chat.completion", chunk_object="chat.completion.chunk"
)
TEXT = _Shape(chat=False, id_prefix="cmpl-", object="text_completion", chunk_object="text_completion")


def _sse(doc: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _chunks(
    job: Job, shape: _Shape, model: str, prefix: str, include_usage: bool
) -> AsyncIterator[bytes]:
    base = {
        "id": shape.id_prefix + job.id,
        "object": shape.chunk_object,
        "created": int(time.time()),
        "model": model,
    }

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse({**base, "choices": choices, **extra})

    if shape.chat:
        yield chunk([shape.choice("", None, chunk=True, first=True)])
    elif prefix:
        yield chunk([shape.choice(prefix, None, chunk=True)])
    tokens_in: int | None = None
    async for record in job.events():
        event = record.parse()
        if isinstance(event, StartedEvent):
            tokens_in = event.tokens_in
        elif isinstance(event, TokenEvent):
            yield chunk([shape.choice(event.t, None, chunk=True)])
        elif isinstance(event, EndEvent):
            try:
                finish = finish_reason(event)
            except OpenAIError as exc:
                yield _sse(exc.body())
                break
            yield chunk([shape.choice("", finish, chunk=True)])
            if include_usage:
                used = _usage(event.tokens_in if event.tokens_in is not None else tokens_in, event.tokens_out)
                yield chunk([], usage=used)
        elif isinstance(event, ErrorEvent):
            yield _sse(OpenAIError.of_event(event).body())
    yield b"data: [DONE]\n\n"


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _answer(
    svc: JobService, job: Job, shape: _Shape, model: str, prefix: str, receive: Receive
) -> Response:
    """Wait for the whole result; a client that goes away first cancels the job."""
    result = asyncio.ensure_future(_collect(job))
    gone = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not result.done():
        svc.cancel(job.id)
        result.cancel()
        await asyncio.gather(result, gone, return_exceptions=True)
        return Response(status_code=499)
    await asyncio.gather(gone, return_exceptions=True)
    outcome = result.result()
    body = {
        "id": shape.id_prefix + job.id,
        "object": shape.object,
        "created": int(time.time()),
        "model": model,
        "choices": [shape.choice(prefix + outcome.text, outcome.finish_reason, chunk=False)],
        "usage": outcome.usage,
    }
    return JSONResponse(body, headers={"X-Job-Id": job.id})


# --- the router -----------------------------------------------------------------------------------------

ServiceOf = Callable[[Request], JobService]


def build_openai_router(
    service_of: ServiceOf = service,
    authorize: Callable[[Request], None] = require_client,
) -> APIRouter:
    """The ``/v1`` routes, on the service ``service_of(request)`` returns, behind ``authorize``."""
    router = APIRouter(prefix="/v1", tags=["openai"])

    async def complete(request: Request, kind: type[ChatCompletionRequest | CompletionRequest]) -> Response:
        try:
            authorize(request)
            try:
                body = kind.model_validate_json(await limited_body(request))
            except ValidationError as exc:
                if exc.errors()[0]["type"] == "json_invalid":
                    raise OpenAIError(400, "the body must be a JSON object", code="invalid_json") from None
                raise OpenAIError.invalid(exc) from None
            task = body.task()
            prefix = body.text if isinstance(body, CompletionRequest) and body.echo else ""
            shape = CHAT if isinstance(body, ChatCompletionRequest) else TEXT
            svc = service_of(request)
            job = svc.submit(task)
            if body.stream:
                return EventStreamResponse(
                    _chunks(job, shape, body.model, prefix, body.include_usage),
                    on_disconnect=lambda: _cancel(svc, job.id),
                    headers={"X-Job-Id": job.id},
                )
            return await _answer(svc, job, shape, body.model, prefix, request.receive)
        except RbeesError as exc:
            return OpenAIError.of(exc).response()
        except OpenAIError as exc:
            return exc.response()

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, ChatCompletionRequest)

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, CompletionRequest)

    @router.get("/models")
    async def list_models(request: Request) -> Response:
        try:
            authorize(request)
        except RbeesError as exc:
            return OpenAIError.of(exc).response()
        data = [_model_card(m) for m in service_of(request).models()]
        return JSONResponse({"object": "list", "data": data})

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        try:
            authorize(request)
        except RbeesError as exc:
            return OpenAIError.of(exc).response()
        for summary in service_of(request).models():
            if summary.model == model_id:
                return JSONResponse(_model_card(summary))
        message = f"The model {model_id!r} does not exist"
        return OpenAIError(404, message, code="model_not_found", param="model").response()

    return router


def _cancel(svc: JobService, job_id: str) -> None:
    svc.cancel(job_id)


def _model_card(summary: ModelSummary) -> dict[str, Any]:
    return {
        "id": summary.model,
        "object": "model",
        "created": int(summary.created_at),
        "owned_by": OWNER,
        "workers": summary.workers,
        "ready_workers": summary.schedulable_workers,
        "slots_total": summary.slots_total,
    }
