"""paho's client, using the socket in large gulps instead of a few bytes at a time.

paho reads every packet with at least three recv() calls (the type byte, the length,
the rest): for the PUBACKs of a QoS 1 stream, a 4-byte packet each, that was three
system calls per message and the largest single cost of the publisher's network thread.
And it writes each packet with a send() of its own. This client reads whatever the
socket has (up to READ_AHEAD bytes) and serves paho's small reads from that buffer, and
collects the packets paho writes in one `loop_write()` to send them together. For MQTT
3.1.1 it also takes PUBACKs the short way (see `_handle_pubackcomp`). Only the publisher
process imports it (and so paho).

For the outbox's QoS 1 stream it also publishes without paho's message objects
(`queue_publish`): paho's `publish()` builds a message, an info
object with a Condition of its own and an entry in its in-flight table for every
message, checks the topic and logs, about two fifths of the publisher's CPU. The
publisher keeps each packet until its PUBACK instead, and sends it again (flagged DUP)
after a reconnect, which is all that paho's table did for it.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

READ_AHEAD = 65536
# What paho builds anew for every MQTT 3.1.1 PUBACK, which carries neither (a 2-byte id)
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


_PUBLISH_QOS1 = 0x32  # PUBLISH, QoS 1; | 0x01 retained, | 0x08 DUP
_DUP = 0x08
_MID = struct.Struct("!H")
_DISCONNECT = b"\xe0\x00"


def publish_packet(mid: int, topic: bytes, payload: bytes, retain: bool) -> bytes:
    """An MQTT 3.1.1 QoS 1 PUBLISH, as paho's `_send_publish` makes it."""
    remaining = 2 + len(topic) + 2 + len(payload)
    header = bytearray((_PUBLISH_QOS1 | retain,))
    while True:  # the remaining length, 7 bits a byte
        byte, remaining = remaining & 0x7F, remaining >> 7
        header.append(byte | 0x80 if remaining else byte)
        if not remaining:
            break
    return b"".join((header, _MID.pack(len(topic)), topic, _MID.pack(mid), payload))


def as_duplicate(packet: bytes) -> bytes:
    """The same PUBLISH with its DUP flag set, to send again after a reconnect."""
    return bytes((packet[0] | _DUP,)) + packet[1:]


def write_later(client: mqtt.Client, userdata: object, sock: object) -> None:
    """For `on_socket_register_write`: with it set, paho queues each packet instead of
    writing it at once, and the caller's loop writes them all in its next loop_write."""
    # paho 2.2 private: `_packet_queue` calls loop_write() itself only when this is unset


class BufferedClient(mqtt.Client):
    """`mqtt.Client` with buffered reads; everything else is paho's.

    `_sock_recv` is paho's one place that reads the socket (2.x). `loop_read` reads at
    most as many packets as messages are in flight, then waits for the socket to be
    readable again: packets already in the buffer (or, with TLS, in the SSL object) would
    wait with it, so it goes on while there are any.
    """

    _buffer: bytes = b""
    _offset: int = 0
    _buffered_socket: object = None
    _outgoing: bytearray | None = None  # collected during loop_write, for this socket
    _outgoing_socket: object = None
    # called with the message id of each PUBACK for a `queue_publish`ed packet
    on_lean_puback: Callable[[int], None] | None = None

    def queue_publish(self, mid: int, topic: bytes, payload: bytes, retain: bool) -> bytes:
        """Queue a QoS 1 PUBLISH behind paho's own packets, in order (the next loop_write
        sends it), and return it. paho neither keeps nor resends it: the caller keeps it
        until `on_lean_puback(mid)`, and hands it to `queue_again` after a reconnect."""
        packet = publish_packet(mid, topic, payload, retain)
        # paho 2.2 private: `_packet_queue` sends the bytes as given, reads no info for QoS 1,
        # and reconnect() clears the queue (so a queue_again never sends a packet twice)
        self._packet_queue(PacketTypes.PUBLISH, packet, mid, 1)
        return packet

    def queue_again(self, mid: int, packet: bytes) -> None:
        """Queue a packet from `queue_publish` once more, flagged DUP."""
        # paho 2.2 private: as in queue_publish
        self._packet_queue(PacketTypes.PUBLISH, as_duplicate(packet), mid, 1)

    def _sock_recv(self, bufsize: int) -> bytes:
        # paho 2.2 private: `_packet_read`'s only read of the socket, via `self._sock`
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

    def _sock_send(self, buf: bytes | bytearray) -> int:
        # paho 2.2 private: `_packet_write`'s only write; a full count marks the packet sent
        if self._outgoing is None or self._sock is not self._outgoing_socket:
            return super()._sock_send(buf)  # outside loop_write: as paho does
        self._outgoing += buf
        return len(buf)

    def _send_outgoing(self) -> None:
        """Send what loop_write collected; what the socket does not take yet stays for the
        next call (`want_write` says so, and the caller's select waits for room)."""
        if not self._outgoing or self._sock is not self._outgoing_socket:
            self._outgoing = None
            return
        try:
            sent = super()._sock_send(self._outgoing)
        except BlockingIOError:
            return
        except OSError:  # the connection is gone: paho resends what was unacknowledged
            self._outgoing = None
            return
        del self._outgoing[:sent]

    def want_write(self) -> bool:
        # paho 2.2: its loop_write() asks this to (un)register the socket for writing
        return bool(self._outgoing) or super().want_write()

    def loop_write(self) -> MQTTErrorCode:
        # paho 2.2 private: `_packet_write` sends every queued packet through `_sock_send`
        self._send_outgoing()
        if self._outgoing:  # still full: paho's packets wait their turn, in order
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        self._outgoing, self._outgoing_socket = bytearray(), self._sock
        try:
            rc = super().loop_write()
        finally:
            self._send_outgoing()
        return rc

    def _sock_close(self) -> None:
        # paho 2.2 private: called right after a DISCONNECT is written, and whenever the
        # connection ends (a drop, reconnect())
        self._send_outgoing()  # a DISCONNECT paho just wrote goes out before the close
        self._outgoing = None
        super()._sock_close()

    def leave(self) -> None:
        """Say goodbye now, ahead of anything queued: a DISCONNECT, so that the broker
        drops the last will, and nothing after it. With a packet half sent, a DISCONNECT
        would be read as part of it: then the connection is only closed (and the broker
        publishes the will)."""
        # paho 2.2 private: `self._sock` is the connected socket, None when there is none
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError):
            if not self._outgoing:
                sock.send(_DISCONNECT)
            sock.close()

    def _buffered(self) -> bool:
        """Bytes already read that select() cannot see: in our buffer, or (TLS) decrypted
        and waiting in the SSL object, which paho's own loop checks for the same reason."""
        # paho 2.2 private: `self._sock` is the connected socket, None when there is none
        if self._sock is None:
            return False
        pending = getattr(self._sock, "pending", None)
        if pending is not None and pending() > 0:
            return True
        return self._sock is self._buffered_socket and self._offset < len(self._buffer)

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        """A 3.1.1 PUBACK is a message id and nothing else; paho still built a ReasonCode
        and a Properties object for each (and a packet tuple around them): a fifth of the
        publisher's CPU. Those are shared here. MQTT 5 and PUBCOMP go paho's way."""
        # paho 2.2 private: `_in_packet["packet"]` holds the bytes after the fixed header,
        # and `_out_messages` (under `_out_message_mutex`) only paho's own publish() calls
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol == MQTTProtocolVersion.MQTTv5 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = packet[0] << 8 | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:  # paho's check: a PUBACK is reported once
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        if self.on_lean_puback is not None:  # one of ours (or a stray: the owner checks)
            self.on_lean_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        # paho 2.2 private: super() reads max(len(_out_messages) + len(_in_messages), 1)
        # packets whatever max_packets says, so 1 for a stream of `queue_publish`es
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._buffered():
            rc = super().loop_read(max_packets)
        return rc
