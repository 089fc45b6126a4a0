"""Errors of the pool CLI: a clear one-line message (plus optional detail) and a documented exit code.

Exception tree::

    PoolError             1  something failed (the message says what)
    ├── InvalidInput      2  a bad argument: an unsafe id, a malformed repo, a missing file
    ├── NotFound          3  an unknown model or worker id
    ├── Conflict          4  a duplicate id, a port already taken
    ├── PreflightFailed   5  spawn refused before starting anything (backend, model, memory)
    ├── DownloadFailed    6  a download did not complete; the catalog still says not downloaded
    └── SpawnFailed       7  the worker started but never became ready (it was killed)
"""

from __future__ import annotations


class PoolError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InvalidInput(PoolError):
    exit_code = 2


class NotFound(PoolError):
    exit_code = 3


class Conflict(PoolError):
    exit_code = 4


class PreflightFailed(PoolError):
    exit_code = 5


class DownloadFailed(PoolError):
    exit_code = 6


class SpawnFailed(PoolError):
    exit_code = 7
