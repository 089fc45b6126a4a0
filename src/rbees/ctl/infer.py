"""`rbees infer`: one prompt through the orchestrator (or straight to a worker), streamed to stdout."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rbees.ctl.streaming import (
    DEFAULT_ORCHESTRATOR,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ApiTokenOpt,
    JsonOpt,
    OrchestratorOpt,
    StreamOutcome,
    build_request,
    checked_url,
    cli_errors,
    fail,
    orchestrator_client,
    print_events,
    say,
)
from rbees.protocol import ExecuteRequest, Priority, TaskRequest

if TYPE_CHECKING:
    from rbees.sdk import Client, SyncEventStream

PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="The prompt; '-' reads it from stdin.")]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Model id (default: the one model the orchestrator serves)."),
]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy.")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Same seed, same tokens (random if left out).")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop sequence (repeatable).")]
PriorityOpt = Annotated[Priority, typer.Option("--priority", help="Queue class.")]
ChatOpt = Annotated[
    bool, typer.Option("--chat", help="Send the prompt as a user message, through the model's chat template.")
]
SystemOpt = Annotated[str | None, typer.Option("--system", help="System message (implies --chat).")]


def read_prompt(prompt: str) -> str:
    return sys.stdin.read() if prompt == "-" else prompt


def sampling_fields(
    prompt: str,
    *,
    chat: bool,
    system: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float | None,
    seed: int | None,
    stop: list[str] | None,
) -> dict[str, Any]:
    """The generation fields shared by an orchestrator task and a worker job."""
    text = read_prompt(prompt)
    fields: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": stop or None,
    }
    if chat or system is not None:
        messages = [{"role": "system", "content": system}] if system is not None else []
        fields["messages"] = [*messages, {"role": "user", "content": text}]
    else:
        fields["prompt"] = text
    return fields


def stream_and_report(
    stream: SyncEventStream, cancel: Callable[[str], object] | None, *, as_json: bool
) -> StreamOutcome:
    """Print a job's events and a summary; on Ctrl-C cancel the job (with ``cancel``) and exit 130."""
    try:
        outcome = print_events(stream, as_json=as_json, last_event_id=lambda: stream.last_event_id)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        if stream.job_id is not None and cancel is not None:
            cancel(stream.job_id)
            say(f"cancelled job {stream.job_id}")
        elif stream.job_id is not None:
            job = stream.job_id
            say(f"stopped following job {job}; it goes on (`rbees jobs cancel {job}` stops it)")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if outcome.job_id is None:
        outcome.job_id = stream.job_id
    say(outcome.summary())
    return outcome


def only_model(client: Client) -> str:
    """The model to use when none was named: the only one a healthy worker serves (the only one
    registered, with a client token that may not list workers)."""
    from rbees.sdk import AuthenticationError, PermissionDeniedError

    try:
        served = sorted({w.model for w in client.workers() if w.model and w.ready})
    except (AuthenticationError, PermissionDeniedError):
        served = sorted({m.id for m in client.models() if m.ready_workers is None or m.ready_workers > 0})
    if len(served) == 1:
        return served[0]
    if not served:
        raise fail("no worker serves any model yet; start one (e.g. `rbees up`) or give --model", EXIT_FAILED)
    raise fail(f"several models are served, pick one with --model: {', '.join(served)}", EXIT_USAGE)


def infer(
    prompt: PromptOpt,
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 128,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    priority: PriorityOpt = Priority.INTERACTIVE,
    chat: ChatOpt = False,
    system: SystemOpt = None,
    orchestrator: OrchestratorOpt = DEFAULT_ORCHESTRATOR,
    api_token: ApiTokenOpt = None,
    worker: Annotated[
        str | None,
        typer.Option(
            "--worker", "-w", help="Skip the orchestrator: call this worker's /execute (host:port)."
        ),
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", envvar="RBEES_WORKER_TOKEN", help="The worker's bearer token.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run one prompt and stream the answer to stdout (a tokens/s summary goes to stderr)."""
    fields = sampling_fields(
        prompt,
        chat=chat,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
    )
    if worker is not None:
        if model is not None or priority is not Priority.INTERACTIVE:
            # A worker runs the one model it loaded and has no queue: these would be ignored.
            raise fail(
                "--model and --priority are for the orchestrator; --worker runs its own model", EXIT_USAGE
            )
        outcome = _infer_worker(worker, token, fields, as_json=as_json)
    else:
        outcome = _infer_orchestrator(orchestrator, api_token, model, priority, fields, as_json=as_json)
    raise typer.Exit(outcome.exit_code)


def _infer_orchestrator(
    url: str,
    api_token: str | None,
    model: str | None,
    priority: Priority,
    fields: dict[str, Any],
    *,
    as_json: bool,
) -> StreamOutcome:
    with orchestrator_client(url, api_token) as client:
        request = build_request(
            TaskRequest, {**fields, "model": model or only_model(client), "priority": priority}
        )
        return stream_and_report(client.stream(request), client.cancel, as_json=as_json)


def _infer_worker(address: str, token: str | None, fields: dict[str, Any], *, as_json: bool) -> StreamOutcome:
    from rbees.sdk import WorkerClient

    url = checked_url(address if "://" in address else f"http://{address}", "worker")
    job_id = f"cli-{uuid.uuid4().hex[:12]}"
    with cli_errors(f"the worker at {url}"), WorkerClient(url, token=token) as client:
        request = build_request(ExecuteRequest, {**fields, "job_id": job_id})
        return stream_and_report(client.execute(request), client.cancel, as_json=as_json)
