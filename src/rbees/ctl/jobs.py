"""`rbees jobs submit|list|status|cancel|follow`: jobs on the orchestrator."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rbees.ctl.infer import (
    ChatOpt,
    MaxTokensOpt,
    ModelOpt,
    PriorityOpt,
    PromptOpt,
    SeedOpt,
    StopOpt,
    SystemOpt,
    TemperatureOpt,
    TopPOpt,
    only_model,
    sampling_fields,
    stream_and_report,
)
from rbees.ctl.streaming import (
    DEFAULT_ORCHESTRATOR,
    ApiTokenOpt,
    JsonOpt,
    OrchestratorOpt,
    build_request,
    format_table,
    orchestrator_client,
    say,
)
from rbees.protocol import Priority, TaskRequest

if TYPE_CHECKING:
    from rbees.sdk import JobInfo

jobs_app = typer.Typer(
    help="Submit, list, inspect, cancel and follow jobs on the orchestrator.", no_args_is_help=True
)

JobIdArg = Annotated[str, typer.Argument(help="The job id.")]


def _dump(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, default=str))


@jobs_app.command("submit")
def submit(
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
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream the job's tokens after submitting.")
    ] = False,
    orchestrator: OrchestratorOpt = DEFAULT_ORCHESTRATOR,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a job and print its id (then, with --follow, stream it)."""
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
    with orchestrator_client(orchestrator, api_token) as client:
        request = build_request(
            TaskRequest, {**fields, "model": model or only_model(client), "priority": priority}
        )
        accepted = client.enqueue(request)
        if as_json and not follow:
            _dump(accepted.model_dump(mode="json"))
        elif not follow:
            typer.echo(accepted.job_id)
        else:
            say(f"job {accepted.job_id} queued at position {accepted.queue_position}")
            outcome = stream_and_report(client.events(accepted.job_id), None, as_json=as_json)
            raise typer.Exit(outcome.exit_code)


@jobs_app.command("list")
def list_jobs(
    status: Annotated[
        str | None,
        typer.Option("--status", help="Only jobs in this state (queued, running, ...)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Most jobs to show.")] = 50,
    orchestrator: OrchestratorOpt = DEFAULT_ORCHESTRATOR,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recent jobs, newest first."""
    with orchestrator_client(orchestrator, api_token) as client:
        jobs = client.jobs(status=status, limit=limit)
    if as_json:
        _dump([job.model_dump(mode="json") for job in jobs])
        return
    headers = ("JOB", "STATUS", "MODEL", "PRIORITY", "WORKER", "TOKENS", "STOP", "CREATED")
    rows = [
        (
            job.job_id,
            job.status,
            job.model or "",
            job.priority or "",
            job.worker_id or "",
            "" if job.tokens_out is None else str(job.tokens_out),
            job.stop_reason or _error_code(job),
            str(job.created_at or ""),
        )
        for job in jobs
    ]
    typer.echo(format_table(headers, rows))
    say(f"{len(jobs)} job(s)")


def _error_code(job: JobInfo) -> str:
    if isinstance(job.error, dict):
        return str(job.error.get("code", ""))
    return ""


@jobs_app.command("status")
def status(
    job_id: JobIdArg,
    orchestrator: OrchestratorOpt = DEFAULT_ORCHESTRATOR,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A job's state, worker, token counts and timings."""
    with orchestrator_client(orchestrator, api_token) as client:
        job = client.job(job_id)
    doc = job.model_dump(mode="json", exclude_none=True)
    if as_json:
        _dump(doc)
        return
    width = max(len(k) for k in doc)
    for key, value in doc.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else value
        typer.echo(f"{key:<{width}}  {shown}")


@jobs_app.command("cancel")
def cancel(
    job_id: JobIdArg,
    orchestrator: OrchestratorOpt = DEFAULT_ORCHESTRATOR,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a queued or running job (its stream ends with stop_reason CANCELLED)."""
    with orchestrator_client(orchestrator, api_token) as client:
        answer = client.cancel(job_id)
    if as_json:
        _dump(answer if answer is not None else {"job_id": job_id})
        return
    status = answer.get("status") if isinstance(answer, dict) else None
    if status in ("completed", "failed"):
        say(f"job {job_id} already {status}; nothing to cancel")
    elif status == "cancelled":
        say(f"job {job_id} is cancelled")
    else:
        say(f"cancel requested for job {job_id}")


@jobs_app.command("follow")
def follow(
    job_id: JobIdArg,
    last_event_id: Annotated[
        str | None, typer.Option("--last-event-id", help="Resume after this event id.")
    ] = None,
    orchestrator: OrchestratorOpt = DEFAULT_ORCHESTRATOR,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stream a job's tokens (replays a finished job); --json prints each event with its id."""
    with orchestrator_client(orchestrator, api_token) as client:
        outcome = stream_and_report(client.events(job_id, last_event_id), None, as_json=as_json)
    raise typer.Exit(outcome.exit_code)
