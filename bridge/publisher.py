"""The publisher: a dumb, reliable pipe from the outbox to the broker.

It runs in a child process of its own (`PublisherProcess`), so paho's per-message
work never competes with the webhook path for the GIL. It reads the outbox from
SQLite in order and hands each message to paho at QoS 1, keeping up to `window`
messages unacknowledged. A row leaves the outbox only after the broker's PUBACK.
paho resends what was in flight after a reconnect; a restart starts again from the
oldest row still in the outbox. Either way delivery is at-least-once and in the
order received.

On every connect: `bridge/state` = `online`, then every retained message the store
stands for (discovery, per-eSIM state), because the broker may have lost them.
Home Assistant's birth message triggers the same, after a short random delay.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import random
import sqlite3
import ssl
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized, SynchronizedString
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge import store as storage
from bridge.topics import Message

log = logging.getLogger(__name__)

READ_BATCH = 1000
ACK_FLUSH = 512
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


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the publisher needs, picklable for the child process."""

    db_path: str
    synchronous: str
    address: BrokerAddress
    client_id: str
    base: str
    qos: int = 1
    keepalive: int = 30
    birth_topic: str | None = None
    window: int = 1000
    log_level: str = "INFO"


class Shared:
    """What the webhook process may read of the publisher's state (shared memory)."""

    def __init__(self, ctx: Any) -> None:
        self.connected: Synchronized[int] = ctx.Value("i", 0, lock=False)
        self.published: Synchronized[int] = ctx.Value("q", 0, lock=False)
        self.error: SynchronizedString = ctx.Array("c", 512, lock=False)
        self.stop: Any = ctx.Event()
        self.drain_seconds: Synchronized[float] = ctx.Value("d", 5.0, lock=False)

    def set_error(self, text: str | None) -> None:
        self.error.value = (text or "").encode()[:511]

    def get_error(self) -> str | None:
        return self.error.value.decode(errors="replace") or None


class Publisher:
    """Drains the outbox into one paho client. Runs in the publisher process."""

    def __init__(self, settings: Settings, shared: Shared, wake: Connection | None) -> None:
        self.settings = settings
        self.shared = shared
        self.wake_pipe = wake
        self.state_topic = f"{settings.base}/bridge/state"
        self.connected = False
        self._pending: dict[int, int | None] = {}  # mid -> outbox id (None: not from the outbox)
        self._acks: collections.deque[int] = collections.deque()
        self._done: list[int] = []  # outbox ids acknowledged, waiting to be deleted
        self._cursor = 0
        self._wake = threading.Event()
        self._snapshot_at: float | None = None
        self._stopping = False
        self._deadline: float | None = None  # set when the drain on stop begins
        self._db = storage.connect(Path(settings.db_path), settings.synchronous)
        self._published = 0

        address = settings.address
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        client.max_inflight_messages_set(settings.window)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.will_set(self.state_topic, b"offline", qos=settings.qos, retain=True)
        if address.username is not None:
            client.username_pw_set(address.username, address.password)
        if address.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self.client = client

    # -- paho callbacks (paho's network thread; short, and lock-free) ------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            error = f"the broker refused the connection: {reason}"
            self.shared.set_error(error)
            log.error("%s (check mqtt.url's user and password)", error)
            return
        address = self.settings.address
        log.info("connected to the broker at %s:%d", address.host, address.port)
        self.connected = True
        self.shared.connected.value = 1
        self.shared.set_error(None)
        if self.settings.birth_topic is not None:
            client.subscribe(self.settings.birth_topic, qos=1)
        self._snapshot_at = time.monotonic()  # `online` first, then every retained message
        self._wake.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self.connected and not self._stopping:
            log.warning("lost the broker (%s); reconnecting", reason)
        self.connected = False
        self.shared.connected.value = 0
        self.shared.set_error(f"disconnected from the broker: {reason}")

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        self._acks.append(mid)
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.settings.birth_topic and message.payload == b"online":
            delay = random.uniform(*BIRTH_DELAY)
            log.info("Home Assistant is online: republishing discovery and state in %.1fs", delay)
            self._snapshot_at = time.monotonic() + delay
            self._wake.set()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Publish until asked to stop (or the webhook process is gone), then say offline."""
        address = self.settings.address
        self.shared.set_error(f"connecting to {address.host}:{address.port}")
        self.client.connect_async(address.host, address.port, self.settings.keepalive)
        self.client.loop_start()
        threading.Thread(target=self._watch, name="publisher-watch", daemon=True).start()
        try:
            while not self.shared.stop.is_set():
                self._step()
            self._drain(self.shared.drain_seconds.value)
        finally:
            self._stopping = True
            self._take_acks()
            self._flush_done()
            if self.connected:
                info = self.client.publish(self.state_topic, b"offline", self.settings.qos, True)
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(timeout=2.0)
                self.client.disconnect()
            self.client.loop_stop()
            self.shared.connected.value = 0

    def _watch(self) -> None:
        """Turn pokes from the webhook process into wake-ups; exit if the parent dies."""
        parent = os.getppid()
        while True:
            if os.getppid() != parent:
                # Orphaned (the bridge was killed): leave at once, without DISCONNECT, so
                # the broker publishes our last will `offline`.
                os._exit(0)
            if self.wake_pipe is not None and self.wake_pipe.poll(0.5):
                with contextlib.suppress(OSError):
                    os.read(self.wake_pipe.fileno(), 65536)
                self._wake.set()
            elif self.wake_pipe is None:
                time.sleep(0.5)

    def _step(self) -> None:
        self._wake.clear()
        self._take_acks()
        if not self.connected:
            self._flush_done()
            self._wake.wait(0.5)
            return
        if self._snapshot_at is not None and time.monotonic() >= self._snapshot_at:
            self._snapshot_at = None
            self._publish_snapshot()
        rows = storage.read_outbox(self._db, self._cursor, READ_BATCH)
        if rows:
            self._publish_rows(rows)
            return
        self._flush_done()
        self._wake.wait(0.25 if self._snapshot_at is None else 0.05)

    def _drain(self, seconds: float) -> None:
        """On stop: keep sending until the outbox is empty, or `seconds` have passed."""
        deadline = self._deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.connected:
            self._step()
            self._take_acks()
            self._flush_done()
            if not self._pending and not storage.read_outbox(self._db, 0, 1):
                return
        left = storage.backlog(self._db)
        if left:
            log.warning("stopping with %d messages still in the outbox; they are sent on the "
                        "next start", left)

    def _publish_rows(self, rows: list[tuple[int, Message]]) -> None:
        """Send a batch in order; a retained message that a later one in the batch replaces
        is skipped (the topic ends up the same). Event topics are never skipped."""
        last_for_topic = {msg.topic: row_id for row_id, msg in rows if msg.retain}
        for row_id, msg in rows:
            self._cursor = row_id
            if msg.retain and last_for_topic[msg.topic] != row_id:
                self._done.append(row_id)
                continue
            self._send(msg, row_id)
        if len(self._done) >= ACK_FLUSH:
            self._flush_done()

    def _publish_snapshot(self) -> None:
        count = 0
        self._send(Message(self.state_topic, b"online", True), None)
        for msg in storage.iter_snapshot(self._db, self.settings.base):
            if not self.connected:
                return
            self._send(msg, None)
            count += 1
        log.info("republished %d retained messages", count)

    def _send(self, msg: Message, row_id: int | None) -> None:
        while len(self._pending) >= self.settings.window and self.connected:
            if self.shared.stop.is_set() and (
                self._deadline is None or time.monotonic() >= self._deadline
            ):
                break  # stopping, and a stalled broker must not hold the exit up
            self._wake.wait(0.1)
            self._wake.clear()
            self._take_acks()
        info = self.client.publish(msg.topic, msg.payload, qos=self.settings.qos,
                                   retain=msg.retain)
        if self.settings.qos == 0:
            if row_id is not None:
                self._done.append(row_id)
            self._count(1)
            return
        self._pending[info.mid] = row_id

    def _count(self, n: int) -> None:
        self._published += n
        self.shared.published.value = self._published

    def _take_acks(self) -> None:
        acked = 0
        while self._acks:
            mid = self._acks.popleft()
            if mid not in self._pending:
                continue
            row_id = self._pending.pop(mid)
            acked += 1
            if row_id is not None:
                self._done.append(row_id)
        if acked:
            self._count(acked)
        if len(self._done) >= ACK_FLUSH:
            self._flush_done()

    def _flush_done(self) -> None:
        """Delete acknowledged rows. If the store cannot write (disk full), keep them and
        try again later: they are only sent again after a restart (at-least-once)."""
        if not self._done:
            return
        try:
            storage.delete_outbox(self._db, self._done)
        except sqlite3.Error as exc:
            log.warning("could not delete %d sent messages from the outbox yet: %s",
                        len(self._done), exc)
            return
        self._done = []


def _child_main(settings: Settings, shared: Shared, wake: Connection) -> None:
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        Publisher(settings, shared, wake).run()
    except Exception:
        log.exception("the publisher failed")
        shared.set_error("the publisher process failed; see the log")
        raise


class PublisherProcess:
    """The webhook process's handle on the publisher: start, poke, read state, stop."""

    def __init__(self, settings: Settings) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that has threads
        self.settings = settings
        self.address = settings.address
        self.shared = Shared(ctx)
        reader, writer = ctx.Pipe(duplex=False)
        self._reader = reader
        self._writer = writer
        os.set_blocking(writer.fileno(), False)
        self._proc = ctx.Process(target=_child_main, args=(settings, self.shared, reader),
                                 name="esim-bridge-publisher", daemon=True)

    def start(self) -> None:
        self._proc.start()

    def poke(self) -> None:
        """New rows are in the outbox (called by the store's writer after a commit)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._writer.fileno(), b"\0")

    @property
    def connected(self) -> bool:
        return bool(self.shared.connected.value) and self._proc.is_alive()

    @property
    def published(self) -> int:
        return int(self.shared.published.value)

    @property
    def last_error(self) -> str | None:
        if not self._proc.is_alive() and self._proc.exitcode is not None:
            return f"the publisher process exited ({self._proc.exitcode}); restart esim-bridge"
        return self.shared.get_error()

    def stop(self, drain_seconds: float) -> None:
        """Drain for up to `drain_seconds`, publish `offline`, disconnect, exit."""
        self.shared.drain_seconds.value = drain_seconds
        self.shared.stop.set()
        self.poke()
        self._proc.join(drain_seconds + 10)
        if self._proc.is_alive():
            log.warning("the publisher did not stop in time; terminating it")
            self._proc.terminate()
            self._proc.join(5)
        self._writer.close()
        self._reader.close()
