"""The Python SDK of the rbees orchestrator API (the spec's ``llama-orch-sdk``).

::

    from rbees.sdk import Client
    from rbees.protocol import TaskRequest, TokenEvent, EndEvent

    with Client("http://127.0.0.1:8080") as client:
        for event in client.stream(TaskRequest(model="smollm2-135m", prompt="Once upon a time")):
            if isinstance(event, TokenEvent):
                print(event.t, end="", flush=True)
            elif isinstance(event, EndEvent):
                print(f"\\n{event.tokens_out} tokens, {event.stop_reason}")

``AsyncClient`` has the same methods as coroutines and async iterators; ``Client`` runs it on a
private event loop thread. Events are the wire models of :mod:`rbees.protocol`; error answers raise
the typed exceptions below.
"""

from rbees.protocol import (
    EndEvent,
    ErrorEvent,
    Event,
    MetricsEvent,
    QueuedEvent,
    StartedEvent,
    TaskAccepted,
    TaskRequest,
    TokenEvent,
)
from rbees.sdk._async_client import DEFAULT_ORCHESTRATOR_URL, AsyncClient, AsyncWorkerClient
from rbees.sdk._errors import (
    AuthenticationError,
    ConflictError,
    InternalServerError,
    InvalidRequestError,
    JobFailedError,
    JobNotFoundError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    QueueFullError,
    RbeesAPIError,
    RbeesConnectionError,
    RbeesProtocolError,
    RbeesSDKError,
    RbeesTimeoutError,
    ServiceUnavailableError,
    error_from_event,
)
from rbees.sdk._models import JobInfo, ModelInfo, WorkerInfo
from rbees.sdk._stream import EventStream
from rbees.sdk._sync import Client, SyncEventStream, WorkerClient

__all__ = [
    "DEFAULT_ORCHESTRATOR_URL",
    "AsyncClient",
    "AsyncWorkerClient",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "EndEvent",
    "ErrorEvent",
    "Event",
    "EventStream",
    "InternalServerError",
    "InvalidRequestError",
    "JobFailedError",
    "JobInfo",
    "JobNotFoundError",
    "MetricsEvent",
    "ModelInfo",
    "ModelNotFoundError",
    "NotFoundError",
    "PermissionDeniedError",
    "QueueFullError",
    "QueuedEvent",
    "RbeesAPIError",
    "RbeesConnectionError",
    "RbeesProtocolError",
    "RbeesSDKError",
    "RbeesTimeoutError",
    "ServiceUnavailableError",
    "StartedEvent",
    "SyncEventStream",
    "TaskAccepted",
    "TaskRequest",
    "TokenEvent",
    "WorkerClient",
    "WorkerInfo",
    "error_from_event",
]
