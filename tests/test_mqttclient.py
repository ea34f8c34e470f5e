"""BufferedClient, paho with buffered reads and writes, against a real Mosquitto.

The publisher drives it the same way: select(), then loop_read / loop_write / loop_misc.
A tiny socket send buffer makes the kernel take only part of each write, the case
that loopback with its megabytes of buffer otherwise never shows.
"""

from __future__ import annotations

import select
import socket
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.client import MQTTv311
from paho.mqtt.enums import CallbackAPIVersion

from bridge.mqttclient import BufferedClient, as_duplicate, publish_packet, write_later
from tests.brokers import Mosquitto
from tests.processes import Watcher

MESSAGES = 200
SIZE = 20_000  # bytes per payload: 4 MB in all, through a send buffer of a few KB


def drive(client: BufferedClient, until: float) -> None:
    """One turn of the loop the publisher runs."""
    sock = client.socket()
    assert sock is not None, "the connection was closed"
    writable = [sock] if client.want_write() else []
    ready, _, _ = select.select([sock], writable, [], max(0.0, min(0.05, until - time.monotonic())))
    if ready:
        client.loop_read()
    if client.want_write():
        client.loop_write()
    client.loop_misc()


@pytest.mark.parametrize("lean", [False, True], ids=["paho-publish", "queue_publish"])
def test_partial_writes_reach_the_broker_whole_and_in_order(
    mosquitto: Mosquitto, lean: bool
) -> None:
    """Through paho's publish(), and through queue_publish, the publisher's own path."""
    acked: list[int] = []
    disconnects: list[object] = []
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="buffered",
                            protocol=MQTTv311, clean_session=True)
    client.on_socket_register_write = write_later
    client.max_inflight_messages_set(0)
    client.on_publish = lambda c, u, mid, reason, props: acked.append(mid)
    client.on_lean_puback = acked.append
    client.on_disconnect = lambda c, u, flags, reason, props: disconnects.append(reason)
    connected: list[bool] = []
    client.on_connect = lambda c, u, flags, reason, props: connected.append(True)

    with Watcher(mosquitto.port, ["buffered/#"]) as watcher:
        client.connect("127.0.0.1", mosquitto.port, keepalive=30)
        deadline = time.monotonic() + 10
        while not connected and time.monotonic() < deadline:
            drive(client, deadline)
        assert connected, "no CONNACK"
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        mids = []
        for n in range(MESSAGES):
            payload = n.to_bytes(4, "big") * (SIZE // 4)
            if lean:
                client.queue_publish(n + 1, f"buffered/{n % 7}".encode(), payload, False)
                mids.append(n + 1)
            else:
                mids.append(client.publish(f"buffered/{n % 7}", payload, qos=1).mid)
        deadline = time.monotonic() + 15
        while len(acked) < MESSAGES and not disconnects and time.monotonic() < deadline:
            drive(client, deadline)
        client.disconnect()

        assert not disconnects, f"the broker dropped the connection: {disconnects}"
        assert sorted(acked) == sorted(mids), f"{len(acked)} of {MESSAGES} acknowledged"
        for topic in range(7):
            watcher.wait_count(f"buffered/{topic}", len(range(topic, MESSAGES, 7)), timeout=10)
        seen = [int.from_bytes(payload[:4], "big") for _, payload, _ in watcher.messages]
        assert seen == list(range(MESSAGES)), "out of order, or not whole"
        assert all(len(payload) == SIZE for _, payload, _ in watcher.messages)


@pytest.mark.parametrize("size", [0, 1, 100, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152])
@pytest.mark.parametrize("retain", [False, True])
def test_our_publish_packets_are_the_bytes_paho_would_send(size: int, retain: bool) -> None:
    """Byte for byte what paho's own `_send_publish` queues (MQTT 3.1.1, QoS 1), the DUP
    flag included; the sizes straddle each length of the remaining-length field."""
    queued: list[bytes] = []

    class Capture(mqtt.Client):
        def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                          info: object = None) -> mqtt.MQTTErrorCode:
            queued.append(bytes(packet))
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    paho = Capture(CallbackAPIVersion.VERSION2, protocol=MQTTv311)
    paho._sock = socket.socket()  # _send_publish wants a connection; nothing is sent
    try:
        payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        for dup in (False, True):
            paho._send_publish(513, b"esim/8943108170001029631/state", payload, 1, retain, dup)
        ours = publish_packet(513, b"esim/8943108170001029631/state", payload, retain)
        assert queued == [ours, as_duplicate(ours)]
    finally:
        paho._sock.close()
        paho._sock = None
