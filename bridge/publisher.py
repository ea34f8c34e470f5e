"""The publisher: a dumb, reliable pipe from the outbox to the broker.

One thread reads the outbox in order and hands each message to paho at QoS 1,
keeping up to `window` messages unacknowledged. A message leaves the outbox
only after the broker's PUBACK. paho resends what was in flight after a
reconnect; a restart starts again from the oldest row still in the outbox.
Either way delivery is at-least-once and in the order received.

On every connect: `bridge/state` = `online`, then every retained message the
store stands for (discovery, per-eSIM state), because the broker may have lost
them. Home Assistant's birth message triggers the same, after a short delay.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.store import Store
from bridge.topics import Message

log = logging.getLogger(__name__)

READ_BATCH = 1000
ACK_FLUSH = 256
INFO_EVERY = 5.0
BIRTH_DELAY = (0.5, 2.5)


class BrokerAddress(msgspec.Struct, frozen=True):
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


class Publisher:
    """Drains the store's outbox into one paho client. `start()`, then `stop()`."""

    def __init__(
        self,
        store: Store,
        address: BrokerAddress,
        *,
        client_id: str,
        base: str,
        qos: int = 1,
        keepalive: int = 30,
        birth_topic: str | None = None,
        window: int = 1000,
        info: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.address = address
        self.base = base
        self.qos = qos
        self.keepalive = keepalive
        self.birth_topic = birth_topic
        self.window = window
        self.info = info
        self.state_topic = f"{base}/bridge/state"
        self.connected = False
        self.published = 0
        self.last_error: str | None = "not connected yet"

        self._pending: dict[int, int | None] = {}  # mid -> outbox id (None: not from the outbox)
        self._acks: collections.deque[int] = collections.deque()
        self._done: list[int] = []  # outbox ids acknowledged, waiting to be deleted
        self._cursor = 0
        self._wake = threading.Event()
        self._snapshot_at: float | None = None
        self._stopping = False
        self._last_info: bytes | None = None
        self._next_info = 0.0
        self._thread: threading.Thread | None = None

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        client.max_inflight_messages_set(window)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.will_set(self.state_topic, b"offline", qos=qos, retain=True)
        if address.username is not None:
            client.username_pw_set(address.username, address.password)
        if address.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self.client = client
        store.on_commit(self._wake.set)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.client.connect_async(self.address.host, self.address.port, self.keepalive)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Drain what can be drained within `timeout`, publish `offline`, disconnect."""
        deadline = time.monotonic() + timeout
        while self.connected and (self.store.backlog > len(self._done) or self._pending):
            if time.monotonic() >= deadline:
                log.warning(
                    "stopping with %d messages still in the outbox; they are sent on the "
                    "next start", self.store.backlog - len(self._done),
                )
                break
            time.sleep(0.02)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        self._take_acks()
        self._flush_done()
        if self.connected:
            info = self.client.publish(self.state_topic, b"offline", qos=self.qos, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
            self.client.disconnect()
        self.client.loop_stop()
        self.connected = False

    # -- paho callbacks (paho's network thread; keep them short and lock-free) ---------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = f"the broker refused the connection: {reason}"
            log.error("%s (check mqtt.url's user and password)", self.last_error)
            return
        log.info("connected to the broker at %s:%d", self.address.host, self.address.port)
        self.connected = True
        self.last_error = None
        if self.birth_topic is not None:
            client.subscribe(self.birth_topic, qos=1)
        self._snapshot_at = time.monotonic()  # `online` first, then every retained message
        self._next_info = 0.0
        self._wake.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self.connected and not self._stopping:
            log.warning("lost the broker (%s); reconnecting", reason)
        self.connected = False
        self.last_error = f"disconnected from the broker: {reason}"

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        self._acks.append(mid)
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.birth_topic and message.payload == b"online":
            delay = random.uniform(*BIRTH_DELAY)
            log.info("Home Assistant is online: republishing discovery and state in %.1fs", delay)
            self._snapshot_at = time.monotonic() + delay
            self._wake.set()

    # -- the publisher thread ----------------------------------------------------------------

    def _run(self) -> None:
        reader = self.store.reader()
        try:
            while not self._stopping:
                self._wake.clear()
                self._take_acks()
                if not self.connected:
                    self._flush_done()
                    self._wake.wait(0.5)
                    continue
                if self._snapshot_at is not None and time.monotonic() >= self._snapshot_at:
                    self._snapshot_at = None
                    self._publish_snapshot(reader)
                self._maybe_publish_info()
                rows = self.store.read_outbox(reader, self._cursor, READ_BATCH)
                if rows:
                    self._publish_rows(rows)
                    continue
                self._flush_done()
                self._wake.wait(0.25 if self._snapshot_at is None else 0.05)
        except Exception:
            log.exception("the publisher stopped on an error; restart esim-bridge")
            self.last_error = "the publisher thread died"
            raise
        finally:
            reader.close()

    def _publish_rows(self, rows: list[tuple[int, Message]]) -> None:
        """Send a batch in order; a retained message a later one in the batch replaces is
        skipped (its topic ends up the same). Event topics are never skipped."""
        last_for_topic = {msg.topic: row_id for row_id, msg in rows if msg.retain}
        for row_id, msg in rows:
            if self._stopping:
                return
            self._cursor = row_id
            if msg.retain and last_for_topic[msg.topic] != row_id:
                self._done.append(row_id)
                continue
            self._send(msg, row_id)
        if len(self._done) >= ACK_FLUSH:
            self._flush_done()

    def _publish_snapshot(self, reader: Any) -> None:
        count = 0
        self._send(Message(self.state_topic, b"online", True), None)
        for msg in Store.iter_snapshot(reader, self.base):
            if self._stopping or not self.connected:
                return
            self._send(msg, None)
            count += 1
        log.info("republished %d retained messages", count)
        self._next_info = 0.0

    def _send(self, msg: Message, row_id: int | None) -> None:
        while len(self._pending) >= self.window and not self._stopping:
            self._wake.wait(0.1)
            self._wake.clear()
            self._take_acks()
        info = self.client.publish(msg.topic, msg.payload, qos=self.qos, retain=msg.retain)
        if self.qos == 0:
            if row_id is not None:
                self._done.append(row_id)
            self.published += 1
            return
        self._pending[info.mid] = row_id

    def _take_acks(self) -> None:
        while self._acks:
            mid = self._acks.popleft()
            if mid not in self._pending:
                continue
            row_id = self._pending.pop(mid)
            self.published += 1
            if row_id is not None:
                self._done.append(row_id)
        if len(self._done) >= ACK_FLUSH:
            self._flush_done()

    def _flush_done(self) -> None:
        if self._done:
            done, self._done = self._done, []
            self.store.delete(done)

    def _maybe_publish_info(self) -> None:
        if self.info is None or time.monotonic() < self._next_info:
            return
        self._next_info = time.monotonic() + INFO_EVERY
        payload = msgspec.json.encode(self.info())
        if payload != self._last_info:
            self._last_info = payload
            self._send(Message(f"{self.base}/bridge/info", payload, True), None)
