"""Token frames written by the decode thread straight to the client's socket.

Handing each token to the event loop costs a wake-up of the loop thread, a GIL hand-off and the
whole ASGI send path: on a small model about as much CPU as the decode step itself, and a loop
thread that is preempted while it holds the GIL stalls the decoding. So once a job's response
headers and ``started`` frame are out, the decode thread writes each token's HTTP chunk itself,
with one non-blocking ``os.write`` (the GIL released meanwhile) on a duplicate of the socket's file
descriptor (a duplicate, so that the descriptor cannot be closed and reused under it).

The loop stays the writer whenever that is not safe: before the headers are out (frames wait in a
list), when the server is not uvicorn answering with chunked encoding, when the socket would block
(the unwritten rest and every later frame go to the loop, for good), and always for the terminal
event, so the worker frees the job's slot before the client can see the job end.

    sink = FrameSink(loop, queue, on_broken=job.cancel.set)
    sink.put(frame)           # decode thread: a token frame
    sink.start(send)          # loop: after the headers and the first frame went out
    sink.close()              # loop: once the decode thread is done with the job
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import fcntl
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from rbees.httpd import LastFrame, Transport, chunk, raw_transport

Item = bytes | LastFrame | None


class _Mode(enum.Enum):
    BUFFER = "buffer"  # the response has not started: frames wait
    DIRECT = "direct"  # the decode thread writes to the socket
    LOOP = "loop"  # the event loop writes (the queue)
    CLOSED = "closed"  # the job is over or its client is gone: frames are dropped


_START_TRIES = 3  # loop turns to wait for the transport's own buffer to drain before direct writes


class FrameSink:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[Item],
        on_broken: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._queue = queue
        self._on_broken = on_broken
        self._lock = threading.Lock()
        self._mode = _Mode.BUFFER
        self._pending: list[bytes] = []
        self._fd = -1
        self.transport: Transport | None = None

    @property
    def direct(self) -> bool:
        return self._mode is _Mode.DIRECT

    def put(self, frame: bytes) -> None:
        """A token frame, from the decode thread."""
        with self._lock:
            mode = self._mode
            if mode is _Mode.DIRECT:
                self._write(chunk(frame))
            elif mode is _Mode.LOOP:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, frame)
            elif mode is _Mode.BUFFER:
                self._pending.append(frame)

    def _write(self, data: bytes) -> None:
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError:  # the client is gone: stop the job, drop what comes
            self._mode = _Mode.CLOSED
            self._on_broken()
            return
        if written < len(data):  # the socket is full: the loop buffers the rest and all that follows
            self._mode = _Mode.LOOP
            # Written by the loop in this callback, before any later frame's hand-off callback runs
            # (and so before the response task can send that frame): the order holds.
            assert self.transport is not None
            self._loop.call_soon_threadsafe(self.transport.write, data[written:])

    def start(self, send: Callable[..., Any]) -> None:
        """In the loop, once the headers and the first frame were sent: let the decode thread write
        from now on, or leave every frame to the loop where that is not safe."""
        self.transport = raw_transport(send)
        self._try_direct(_START_TRIES)

    def _try_direct(self, tries: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self._to_loop()
            return
        if transport.get_write_buffer_size():
            # uvloop flushes its writes at the end of a loop turn; direct writes must not overtake them
            if tries > 0:
                self._loop.call_soon(self._try_direct, tries - 1)
            else:
                self._to_loop()
            return
        fd = _dup_socket(transport)
        if fd < 0:
            self._to_loop()
            return
        with self._lock:
            if self._mode is not _Mode.BUFFER:
                _close(fd)
                return
            self._fd = fd
            self._mode = _Mode.DIRECT
            pending, self._pending = self._pending, []
            if pending:
                self._write(b"".join(chunk(frame) for frame in pending))

    def _to_loop(self) -> None:
        with self._lock:
            if self._mode is _Mode.BUFFER:
                for frame in self._pending:
                    self._queue.put_nowait(frame)
                self._pending = []
                self._mode = _Mode.LOOP

    def close(self) -> None:
        """In the loop, once the decode thread is done with the job: no more writes, fd closed."""
        self._to_loop()  # frames still waiting for the response to start go to the queue
        with self._lock:
            self._mode = _Mode.CLOSED
            _close(self._fd)
            self._fd = -1


def _dup_socket(transport: Transport) -> int:
    if transport.is_closing():
        return -1
    sock = transport.get_extra_info("socket")
    try:
        return dup_holding_gil(sock.fileno()) if sock is not None else -1
    except (OSError, ValueError):
        return -1


# ``os.dup`` lets go of the GIL around its system call. The event loop then has to get it back from
# the decode thread, which keeps it for up to the switch interval: measured in a worker decoding a
# burst, the dup of each response took 80-230 us on average and up to 4 ms, against ~25 us through
# libc called with the GIL held (``ctypes.PyDLL``). Linux only: ``fcntl`` is variadic, which ctypes
# may call like any function on Linux's x86-64 and arm64 conventions but not on Apple's arm64.
_LIBC = ctypes.PyDLL(None, use_errno=True) if sys.platform == "linux" else None


def dup_holding_gil(fd: int) -> int:
    """A close-on-exec duplicate of ``fd``, as ``os.dup`` makes, without releasing the GIL (Linux;
    elsewhere ``os.dup``)."""
    if _LIBC is None:
        return os.dup(fd)
    new = int(_LIBC.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0))
    if new < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return new


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)
