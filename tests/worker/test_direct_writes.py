"""``FrameSink``: token frames written by another thread straight to a real TCP connection.

A real server connection on the running loop stands in for uvicorn's response cycle (the object
whose ``send`` carries ``transport`` and ``chunked_encoding``); the frames are read back by a real
client socket. The end-to-end worker tests run the same path through uvicorn.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from rbees.httpd import chunk, raw_transport
from rbees.worker import direct
from rbees.worker.direct import FrameSink, Item, dup_holding_gil


@dataclass
class Cycle:
    """The two attributes of uvicorn's RequestResponseCycle that the sink looks at."""

    transport: Any
    chunked_encoding: bool | None = True

    async def send(self, message: dict[str, Any]) -> None:  # what uvicorn's send would be bound to
        raise AssertionError("the sink never calls send itself")


@dataclass
class Connection:
    server_transport: asyncio.Transport
    client: socket.socket
    queue: asyncio.Queue[Item]
    broken: threading.Event

    def sink(self) -> FrameSink:
        return FrameSink(asyncio.get_running_loop(), self.queue, on_broken=self.broken.set)

    def read_exactly(self, size: int, timeout: float = 5.0) -> bytes:
        self.client.settimeout(timeout)
        data = b""
        while len(data) < size:
            got = self.client.recv(size - len(data))
            if not got:
                break
            data += got
        return data


@pytest.fixture
async def conn() -> AsyncIterator[Connection]:
    loop = asyncio.get_running_loop()
    made: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            made.set_result(transport)

    server = await loop.create_server(Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    transport = await asyncio.wait_for(made, 5)
    yield Connection(transport, client, asyncio.Queue(), threading.Event())
    client.close()
    transport.close()
    server.close()


def frames(n: int, size: int = 40) -> list[bytes]:
    return [b'data: {"i":%d,"t":"%s"}\n\n' % (i, b"x" * size) for i in range(n)]


async def in_thread(fn: Callable[[], None]) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    await asyncio.to_thread(thread.join)


async def drain_queue(conn: Connection) -> list[Item]:
    """What the sink left to the loop, written as the worker's response writes it."""
    items: list[Item] = []
    while not conn.queue.empty():
        item = conn.queue.get_nowait()
        items.append(item)
        if item is not None:
            conn.server_transport.write(chunk(item))
    return items


async def test_frames_before_the_start_wait_then_the_thread_writes_them_directly(conn: Connection) -> None:
    sink = conn.sink()
    early, late = frames(3), frames(5)[3:]
    for frame in early:
        sink.put(frame)
    assert not _readable(conn), "nothing is written before the response started"
    sink.start(Cycle(conn.server_transport).send)
    assert sink.direct

    def decode_thread() -> None:
        for frame in late:
            sink.put(frame)

    await in_thread(decode_thread)
    expected = b"".join(chunk(f) for f in early + late)
    assert conn.read_exactly(len(expected)) == expected
    assert conn.queue.empty(), "nothing went through the loop"
    sink.close()
    assert not sink.direct


def _readable(conn: Connection) -> bool:
    conn.client.setblocking(False)
    try:
        return bool(conn.client.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        conn.client.setblocking(True)


async def test_a_full_socket_hands_the_rest_to_the_loop_in_order(conn: Connection) -> None:
    sock = conn.server_transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sink = conn.sink()
    sink.start(Cycle(conn.server_transport).send)
    assert sink.direct
    sent = frames(400, size=200)  # far more than both socket buffers hold; nobody reads yet

    def decode_thread() -> None:
        for frame in sent:
            sink.put(frame)

    await in_thread(decode_thread)
    assert not sink.direct, "the full socket switched the job to the loop"
    await asyncio.sleep(0)  # the thread's hand-offs arrive through call_soon_threadsafe
    items = await drain_queue(conn)
    assert items, "the frames after the full write went through the loop"
    expected = b"".join(chunk(f) for f in sent)
    reader = asyncio.create_task(asyncio.to_thread(conn.read_exactly, len(expected), 20.0))
    got = await reader
    assert got == expected
    sink.close()


async def test_a_client_that_is_gone_stops_the_job_and_later_frames_are_dropped(conn: Connection) -> None:
    sink = conn.sink()
    sink.start(Cycle(conn.server_transport).send)
    conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.client.close()  # an abortive close: the next writes fail with a reset
    await asyncio.sleep(0.05)

    def decode_thread() -> None:
        for frame in frames(50):
            sink.put(frame)

    await in_thread(decode_thread)
    assert conn.broken.is_set()
    assert conn.queue.empty()
    sink.close()


async def test_without_uvicorns_chunked_cycle_every_frame_goes_through_the_loop(conn: Connection) -> None:
    async def plain_send(message: dict[str, Any]) -> None:
        raise AssertionError("not called")

    for send in (plain_send, Cycle(conn.server_transport, chunked_encoding=None).send):
        assert raw_transport(send) is None
        sink = conn.sink()
        sink.put(b"a")
        sink.start(send)
        sink.put(b"b")
        await asyncio.sleep(0)
        assert not sink.direct
        assert [conn.queue.get_nowait(), conn.queue.get_nowait()] == [b"a", b"b"]
        sink.close()


async def test_close_releases_the_duplicate_descriptor_and_drops_later_frames(conn: Connection) -> None:
    before = len(os.listdir("/proc/self/fd"))
    sink = conn.sink()
    sink.start(Cycle(conn.server_transport).send)
    assert len(os.listdir("/proc/self/fd")) == before + 1
    sink.close()
    assert len(os.listdir("/proc/self/fd")) == before
    sink.put(b"late")
    assert conn.queue.empty()
    assert not _readable(conn)


def test_the_duplicate_descriptor_is_the_same_socket_and_close_on_exec() -> None:
    # On Linux it comes from libc's fcntl, called with the GIL held (see direct.py), not os.dup.
    assert (direct._LIBC is not None) == (sys.platform == "linux")
    left, right = socket.socketpair()
    try:
        fd = dup_holding_gil(left.fileno())
        try:
            assert fd != left.fileno() and not os.get_inheritable(fd)  # as os.dup makes it
            os.write(fd, b"x")
            assert right.recv(1) == b"x"
        finally:
            os.close(fd)
    finally:
        left.close()
        right.close()
    with pytest.raises(OSError):
        dup_holding_gil(left.fileno())  # closed: an error, never a descriptor of something else
