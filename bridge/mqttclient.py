"""paho's client, reading the socket in large gulps instead of a few bytes at a time.

paho reads every packet with at least three recv() calls (the type byte, the length,
the rest): for the PUBACKs of a QoS 1 stream, a 4-byte packet each, that was three
system calls per message and the largest single cost of the publisher's network thread.
This client reads whatever the socket has (up to READ_AHEAD bytes) and serves paho's
small reads from that buffer. Only the publisher process imports it (and so paho).
"""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

READ_AHEAD = 65536


class BufferedClient(mqtt.Client):
    """`mqtt.Client` with buffered reads; everything else is paho's.

    `_sock_recv` is paho's one place that reads the socket (2.x). `loop_read` reads at
    most as many packets as messages are in flight, then waits for the socket to be
    readable again: packets already in the buffer would wait with it, so it goes on
    while the buffer holds any.
    """

    _buffer: bytes = b""
    _offset: int = 0
    _buffered_socket: object = None

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._sock is not self._buffered_socket:  # a new connection: start empty
            self._buffered_socket, self._buffer, self._offset = self._sock, b"", 0
        if self._offset >= len(self._buffer):
            data = super()._sock_recv(READ_AHEAD)  # raises BlockingIOError when empty
            if not data:
                return data  # the broker closed the connection
            self._buffer, self._offset = data, 0
        start = self._offset
        self._offset = min(start + bufsize, len(self._buffer))
        return self._buffer[start:self._offset]

    def _buffered(self) -> bool:
        return self._sock is self._buffered_socket and self._offset < len(self._buffer)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._buffered():
            rc = super().loop_read(max_packets)
        return rc
