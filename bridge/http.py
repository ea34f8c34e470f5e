"""uvicorn's httptools protocol, sending each answer in one write, with a bound on heads.

uvicorn writes an answer's status line and headers in one `transport.write()` and its
body in another: two system calls per answer, 12 % of the webhook process's main
thread in a profile under load. Here a connection's writes within one turn of the
event loop are held and sent together at the end of that turn.

uvicorn's httptools protocol sets no limit on a request's line and headers: one header
line of 128 MB took 14 s of the event loop to parse (every webhook waited) and left the
process 250 MB larger, before the sender's address was even looked at. A head over
MAX_HEAD is answered 431 and the connection closed. Parsing, keep-alive and flow control
are otherwise uvicorn's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("bridge.http")


class _CoalescingTransport:
    """A connection's transport whose writes in one loop turn leave as one."""

    # uvicorn 0.55 private: answers leave only by write()/close() on the protocol's
    # `transport` attribute; anything else it calls passes through `__getattr__`.

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = [data]
            self._loop.call_soon(self._flush)
        else:
            self._held.append(data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self._flush()  # what was written before the close goes out first
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


# Bytes of a request's line and headers. nginx's default is 8 KB a line; this is far
# above any sender's head, and small enough that parsing it costs a few milliseconds.
MAX_HEAD = 256 * 1024
_TOO_LARGE = b'{"ok":false,"error":"the request line and headers are over 256 KB"}'
_REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_TOO_LARGE)).encode() + b"\r\nconnection: close\r\n\r\n"
    + _TOO_LARGE
)


class HttpProtocol(HttpToolsProtocol):
    """`uvicorn.Config(http=HttpProtocol)`."""

    # these names and `_refuse` are free in uvicorn 0.55's HttpToolsProtocol (none of its own)
    _head_bytes = 0  # received since the last request ended, while no body is coming
    _in_body = False
    _ended = False  # a request ended in the data being parsed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # uvicorn 0.55 private: each request's cycle reads `self.transport` (set here) in
        # on_headers_complete; FlowControl and the addresses keep the real transport.
        super().connection_made(transport)
        self.transport = _CoalescingTransport(transport, self.loop)  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # uvicorn 0.55 private: super() feeds all of `data` to httptools at once, which calls
        # on_headers_complete / on_message_complete (below) before it returns.
        if not self._in_body and not self.transport.is_closing():
            end = data.find(b"\r\n\r\n")  # the head's end, if it is in this data
            if self._head_bytes + (len(data) if end < 0 else end + 4) > MAX_HEAD:
                self._refuse()
                return
        self._ended = False
        super().data_received(data)
        if not (self._in_body or self._ended):  # the head goes on in the next data
            self._head_bytes += len(data)

    def _refuse(self) -> None:
        logger.warning("refused a request from %s: its head is over %d bytes",
                       (self.client or ("?",))[0], MAX_HEAD)
        self.transport.write(_REFUSAL)
        self.transport.close()

    def on_headers_complete(self) -> None:
        # uvicorn 0.55 private: httptools calls this on `self` (HttpRequestParser(self)).
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        # uvicorn 0.55 private: httptools calls this on `self` at each request's end.
        self._in_body, self._head_bytes, self._ended = False, 0, True
        super().on_message_complete()
