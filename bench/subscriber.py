"""The MQTT subscriber that tells when each acknowledged webhook came out.

A paho client on the system's event topic records, per (tag, seq) decoded from
the `notifyId`, the monotonic time the message first arrived. Time is
CLOCK_MONOTONIC, shared by every process on the machine, so it compares
directly with the send times the load generator records in its own process.
It subscribes with QoS 1 so that a message missing here was not published,
not dropped on the way to us.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.webhook import parse_notify_id


class Subscriber:
    def __init__(
        self, port: int, topic_filter: str, client_id: str, persistent: bool = False
    ) -> None:
        self.port = port
        self.topic_filter = topic_filter
        self.tags: dict[int, dict[int, float]] = {}
        self.duplicates = 0
        self.messages = 0
        self._subscribed = threading.Event()
        # A persistent session lets the broker queue what is published while we
        # reconnect after it restarts (the scale scenario); reconnect within a second then.
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent
        )
        self._client.reconnect_delay_set(1, 1)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def track(self, tag: int) -> dict[int, float]:
        """Start recording messages of `tag`; returns the live seq → arrival map."""
        return self.tags.setdefault(tag, {})

    def start(self, timeout: float = 10.0) -> Subscriber:
        self._client.connect("127.0.0.1", self.port, keepalive=60)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise TimeoutError(f"no SUBACK for {self.topic_filter} within {timeout}s")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(self, *_: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        self.messages += 1
        found = parse_notify_id(message.payload)
        if found is None:
            return
        seen = self.tags.get(found[0])
        if seen is None:
            return
        if found[1] in seen:
            self.duplicates += 1
        else:
            seen[found[1]] = now

    def wait_all(self, tag: int, seqs: Iterable[int], timeout: float) -> list[int]:
        """Waits until every seq of `tag` has arrived; returns those still missing."""
        seen = self.track(tag)
        missing = [s for s in seqs if s not in seen]
        deadline = time.monotonic() + timeout
        while missing and time.monotonic() < deadline:
            time.sleep(0.01)
            missing = [s for s in missing if s not in seen]
        return missing
