"""What `rbees infer`, `rbees jobs` and `rbees up` share: client options, printing a job's events, errors.

Exit codes of these commands::

    0    the job ended normally (MAX_TOKENS, EOS or STOP_SEQUENCE) or the command did what it said
    1    the job failed or was cancelled, or the server refused for another reason
    2    invalid input (bad option values, or the server said INVALID_REQUEST)
    3    the orchestrator or worker could not be reached
    4    no such job, model or worker
    130  interrupted with Ctrl-C (a running job is cancelled first)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TextIO, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from rbees.protocol import (
    EndEvent,
    ErrorEvent,
    Event,
    QueuedEvent,
    StartedEvent,
    StopReason,
    TokenEvent,
    is_http_url,
)

if TYPE_CHECKING:
    from rbees.sdk import Client, RbeesSDKError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4
EXIT_INTERRUPTED = 130

OrchestratorOpt = Annotated[
    str,
    typer.Option(
        "--orchestrator",
        "-o",
        envvar="RBEES_ORCHESTRATOR",
        help="Orchestrator base URL.",
        show_default=True,
    ),
]
ApiTokenOpt = Annotated[
    str | None,
    typer.Option("--api-token", envvar="RBEES_API_TOKEN", help="Bearer token of the orchestrator API."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of text.")]

# ``rbees.sdk.DEFAULT_ORCHESTRATOR_URL``, spelled out here: the SDK (and aiohttp with it) is imported only
# when a command talks to a server, so that ``rbees --help`` and the pool commands start fast.
DEFAULT_ORCHESTRATOR = "http://127.0.0.1:8080"
M = TypeVar("M", bound=BaseModel)


def say(message: str) -> None:
    """A diagnostic line on stderr."""
    typer.echo(message, err=True)


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    say(f"error: {message}")
    return typer.Exit(code)


def exit_code_for(exc: RbeesSDKError) -> int:
    from rbees.sdk import InvalidRequestError, NotFoundError, RbeesConnectionError

    if isinstance(exc, RbeesConnectionError):
        return EXIT_UNREACHABLE
    if isinstance(exc, InvalidRequestError):
        return EXIT_USAGE
    if isinstance(exc, NotFoundError):
        return EXIT_NOT_FOUND
    return EXIT_FAILED


def describe(exc: RbeesSDKError) -> str:
    from rbees.sdk import RbeesAPIError

    if isinstance(exc, RbeesAPIError):
        text = f"{exc.code}: {exc.message}"
        if exc.retry_after is not None:
            text += f" (retry after {exc.retry_after:g} s)"
        return text
    return str(exc)


@contextmanager
def cli_errors(target: str) -> Iterator[None]:
    """Turn SDK exceptions and invalid local input into one stderr line and an exit code."""
    from rbees.sdk import RbeesConnectionError, RbeesSDKError

    try:
        yield
    except RbeesConnectionError as exc:
        raise fail(f"cannot reach {target}: {exc}", EXIT_UNREACHABLE) from None
    except RbeesSDKError as exc:
        raise fail(describe(exc), exit_code_for(exc)) from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()
        )
        raise fail(f"invalid request: {problems}", EXIT_USAGE) from None


def checked_url(url: str, what: str) -> str:
    """``url`` when it is an http(s) URL with a host and a valid port; else a usage error."""
    if not is_http_url(url):
        raise fail(f"invalid {what} URL {url!r}: expected http(s)://host:port", EXIT_USAGE)
    return url


@contextmanager
def orchestrator_client(url: str, api_token: str | None) -> Iterator[Client]:
    """A client of the orchestrator whose errors end the command with a message and an exit code."""
    from rbees.sdk import Client

    checked_url(url if "://" in url else f"http://{url}", "orchestrator")  # the SDK adds http:// too
    with cli_errors(f"the orchestrator at {url}"), Client(url, api_token=api_token) as client:
        yield client


def build_request(model: type[M], fields: dict[str, Any]) -> M:
    """Validate a request locally so bad options fail before anything is sent."""
    return model.model_validate({k: v for k, v in fields.items() if v is not None})


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain aligned table that never truncates a cell (ids must stay copyable)."""
    table = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join(lines)


@dataclass
class StreamOutcome:
    """What a printed stream ended with."""

    job_id: str | None = None
    text: str = ""
    tokens_out: int = 0
    end: EndEvent | None = None
    error: ErrorEvent | None = None
    seed: int | None = None
    model: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    events: int = 0

    @property
    def exit_code(self) -> int:
        if self.end is not None and self.end.stop_reason not in (StopReason.CANCELLED, StopReason.ERROR):
            return EXIT_OK
        return EXIT_FAILED

    def tokens_per_second(self) -> float | None:
        if self.end is not None and self.end.decode_time_ms > 0:
            return self.end.tokens_out / (self.end.decode_time_ms / 1000)
        if self.started_at is not None and self.finished_at is not None and self.tokens_out:
            elapsed = self.finished_at - self.started_at
            return self.tokens_out / elapsed if elapsed > 0 else None
        return None

    def summary(self) -> str:
        if self.error is not None:
            return f"error {self.error.code}: {self.error.message}"
        parts: list[str] = []
        end = self.end
        tokens = end.tokens_out if end is not None else self.tokens_out
        parts.append(f"{tokens} tokens")
        if end is not None and end.decode_time_ms:
            parts.append(f"in {end.decode_time_ms / 1000:.2f} s")
        rate = self.tokens_per_second()
        if rate is not None:
            parts.append(f"{rate:.1f} tok/s")
        if end is not None:
            reason = f"stop {end.stop_reason.value}"
            if end.stop_sequence_matched:
                reason += f" ({end.stop_sequence_matched!r})"
            parts.append(reason)
        else:
            parts.append("stream ended without an end event")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        if self.job_id:
            parts.append(f"job {self.job_id}")
        return " · ".join(parts)


def print_events(
    events: Iterable[Event],
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    on_job_id: Callable[[str], None] | None = None,
    last_event_id: Callable[[], str | None] | None = None,
) -> StreamOutcome:
    """Write tokens to stdout as they come (or each event as a JSON line); return how the job ended."""
    stream = out or sys.stdout
    outcome = StreamOutcome()
    for event in events:
        outcome.events += 1
        if isinstance(event, QueuedEvent | StartedEvent) and outcome.job_id is None:
            outcome.job_id = event.job_id
            if on_job_id is not None:
                on_job_id(event.job_id)
        if as_json:
            doc = event.model_dump(mode="json", exclude_none=True)
            event_id = last_event_id() if last_event_id is not None else None
            if event_id is not None:
                doc = {"id": event_id, **doc}
            stream.write(json.dumps(doc) + "\n")
            stream.flush()
        _account(outcome, event, stream, print_tokens=not as_json)
    outcome.finished_at = time.monotonic()
    if not as_json and outcome.text and not outcome.text.endswith("\n"):
        stream.write("\n")
        stream.flush()
    return outcome


def _account(outcome: StreamOutcome, event: Event, stream: TextIO, *, print_tokens: bool) -> None:
    if isinstance(event, QueuedEvent):
        if event.queue_position > 0 and print_tokens:
            say(f"queued at position {event.queue_position}")
    elif isinstance(event, StartedEvent):
        outcome.started_at = time.monotonic()
        outcome.seed = event.seed
        outcome.model = event.model
    elif isinstance(event, TokenEvent):
        if outcome.started_at is None:
            outcome.started_at = time.monotonic()
        outcome.text += event.t
        outcome.tokens_out += 1
        if print_tokens:
            stream.write(event.t)
            stream.flush()
    elif isinstance(event, EndEvent):
        outcome.end = event
    elif isinstance(event, ErrorEvent):
        outcome.error = event
