"""bridge/http.py: an answer's writes in one loop turn leave in one write, in order,
and a close sends what was written before it. Over a real socket pair; the bytes are
read on the other end."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from bridge.http import _CoalescingTransport


class _Counting:
    """The real transport, counting the writes that reach it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def _pair() -> tuple[_Counting, socket.socket]:
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    theirs.settimeout(5)
    return _Counting(transport), theirs


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_writes_in_one_turn_leave_as_one_and_in_order() -> None:
    async def run() -> tuple[list[bytes], bytes]:
        counting, theirs = await _pair()
        coalescing = _CoalescingTransport(counting, asyncio.get_running_loop())  # type: ignore[arg-type]
        coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n")
        coalescing.write(b'{"ok":true}')
        assert counting.writes == []  # held until the end of this turn
        await asyncio.sleep(0)
        coalescing.write(b"next turn")
        await asyncio.sleep(0)
        coalescing.close()
        await asyncio.sleep(0.05)
        received = _read_all(theirs)
        theirs.close()
        return counting.writes, received

    writes, received = asyncio.run(run())
    assert writes == [
        b'HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{"ok":true}',
        b"next turn",
    ]
    assert received == b''.join(writes)


def test_close_sends_what_was_written_before_it() -> None:
    async def run() -> bytes:
        counting, theirs = await _pair()
        coalescing = _CoalescingTransport(counting, asyncio.get_running_loop())  # type: ignore[arg-type]
        coalescing.write(b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\n\r\n")
        coalescing.write(b"{}")
        coalescing.close()  # in the same turn, as uvicorn does after a last body
        await asyncio.sleep(0.05)
        received = _read_all(theirs)  # ends: the connection was closed after the data
        theirs.close()
        return received

    assert asyncio.run(run()) == b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\n\r\n{}"
