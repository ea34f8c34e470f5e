"""The publisher: a dumb, reliable pipe from the outbox to the broker.

It runs in a child process of its own (`python -m bridge.publisher`, started by
`PublisherProcess`), so paho's per-message work never competes with the webhook path
for the GIL. The parent talks to it over the child's stdin (the settings, then a stop
request), wakes it with a byte per commit on a pipe of its own, and reads its status as
JSON lines on its stdout. When the parent dies, stdin closes and the child leaves at
once, without a DISCONNECT, so the broker publishes the last will `offline`. It reads
the outbox from the store (SQLite, or PostgreSQL with store.url) in order and hands each
message to paho at QoS 1, keeping up to `window` messages unacknowledged. A row leaves
the outbox only after the broker's PUBACK.
Each message in flight is kept as its finished PUBLISH packet (`bridge/mqttclient.py`
builds it; paho's message objects cost two fifths of this process's CPU) and sent again,
in order, after a reconnect; a restart starts again from the oldest row still in the
outbox. Either way delivery is at-least-once and in the order received.

On every connect: `bridge/state` = `online`, then every retained topic in the store's
table of them (discovery, per-eSIM state, bridge/info), because the broker may have
lost them; topics with a message still waiting in the outbox are left to it, so no
subscriber sees a newer value before an older one. Home Assistant's birth message
triggers the same, after a short random delay. Messages are never skipped or merged:
after an outage a subscriber sees every value a retained topic took, in order.

paho runs on the publisher's own thread (`_wait`: select, then paho's loop_read,
loop_write and loop_misc), not on a network thread of its own: with two threads, every
message crossed paho's locks and the GIL between them, and cost a wake-up byte on a
socket pair besides. A second, idle thread only reads the parent's pipe.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import select
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn
from urllib.parse import unquote, urlsplit

import msgspec

from bridge import db, outbox
from bridge.lease import Lease
from bridge.logs import configure_logging
from bridge.outbox import Message

if TYPE_CHECKING:  # imported where used: the webhook process never loads paho
    import paho.mqtt.client as mqtt

log = logging.getLogger("bridge.publisher")  # not __main__ when run with -m

READ_BATCH = 5000  # outbox rows read at a time
ACK_FLUSH = 512
# Sent rows are deleted in batches, at most this often when the outbox runs dry: each
# delete is a write to the store (pages in the WAL, later copied into the database), and
# a delete per webhook doubled the disk writes at moderate rates.
DELETE_EVERY = 0.2
BIRTH_DELAY = (0.5, 2.5)
STATUS_EVERY = 0.2
RECONNECT_DELAY = (1.0, 10.0)  # s: the first retry, and the longest wait between retries
CONNECT_LOG_EVERY = 60.0  # s: a connect that keeps failing for the same reason is logged this often
RESTART_DELAY = (1.0, 30.0)  # s: a publisher that died is started again after this, doubling
RESTART_RESET = 60.0  # s: a publisher that ran this long starts the back-off over
STEPPED_DOWN = 3  # the exit code of a publisher that lost the lease: started again at once
WATCH_EVERY = 0.1  # s between the watchdog's looks at the lease
WATCH_GRACE = 0.5  # s the loop has to step down by itself once the lease has run out


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
    # PostgreSQL (store.url) instead of the SQLite file at db_path; a password in it
    # stays off argv: the settings go over stdin
    store_url: str | None = None
    address: BrokerAddress
    client_id: str
    state_topic: str  # `online` on connect, `offline` on stop and as the last will
    qos: int = 1
    keepalive: int = 30
    birth_topic: str | None = None
    # Topic filters whose (not retained) messages are commands for the webhook process:
    # passed on to it as they come, never interpreted here.
    commands: list[str] = msgspec.field(default_factory=list)
    # Messages in flight. A local broker's PUBACK is back well within a millisecond, so
    # 300 keep the pipe full; each costs ~3.5 KB in paho (the message, and its info with
    # a Condition): a window of 1,000 raised this process's peak memory by 2.5 MB.
    window: int = 300
    log_level: str = "INFO"


class Status(msgspec.Struct, tag="status"):
    """What the publisher tells the webhook process, one JSON line at a time."""

    connected: bool = False
    # this replica publishes: always on SQLite; with store.url, while it holds the lease
    publishing: bool = False
    lease_error: str | None = None  # why this replica cannot try for the lease now
    published: int = 0
    error: str | None = None


class Command(msgspec.Struct, tag="command"):
    """A message that came on one of `Settings.commands`, passed on to the parent."""

    topic: str
    payload: bytes


Line = Status | Command

class StatusWriter:
    """Writes `Status` lines to the parent (one writer now; the lock keeps it safe for more)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.status = Status()
        self._out = out
        self._lock = threading.Lock()
        self._sent = Status(error="not started")
        self._sent_at = 0.0

    def update(self, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self.status, key, value)

    def flush(self) -> None:
        """Send the status if it changed: at once for anything but the count, and at most every
        STATUS_EVERY seconds when only the published count moved (it moves all the time)."""
        with self._lock:
            status, sent = self.status, self._sent
            if status == sent:
                return
            only_count = status == msgspec.structs.replace(sent, published=status.published)
            if only_count and time.monotonic() - self._sent_at < STATUS_EVERY:
                return
            line = msgspec.json.encode(status) + b"\n"
            self._sent = msgspec.structs.replace(status)
            self._sent_at = time.monotonic()
        self._write(line)

    def command(self, topic: str, payload: bytes) -> None:
        """Pass a command on at once."""
        self._write(msgspec.json.encode(Command(topic, payload)) + b"\n")

    def _write(self, line: bytes) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._out.write(line)
            self._out.flush()


class Waker:
    """A flag the publisher's loop can wait for in the same select() as the broker's
    socket: `set()` from any thread writes a byte to a pipe, `clear()` empties it."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: it is set already
            os.write(self._write, b"!")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass


class Publisher:
    """Drains the outbox into one paho client. Runs in the publisher process."""

    def __init__(
        self, settings: Settings, status: StatusWriter, control: IO[bytes], pokes: int | None
    ) -> None:
        self.settings = settings
        self.status = status
        self.control = control
        self._pokes = pokes  # the read end of the parent's poke pipe, waited on in _wait
        self.drain_seconds = 5.0
        self._stop = threading.Event()
        self.state_topic = settings.state_topic
        self.connected = False
        # mid -> (outbox id, or None when not from the outbox; its PUBLISH, to send again
        # after a reconnect), in the order sent
        self._pending: dict[int, tuple[int | None, bytes]] = {}
        self._mid = 0  # the last message id given out
        self._acks: collections.deque[int] = collections.deque()
        self._done: list[int] = []  # outbox ids acknowledged, waiting to be deleted
        self._cursor = 0
        self._flushed_at = 0.0
        self._wake = Waker()
        self._next_connect = 0.0
        self._connect_delay = RECONNECT_DELAY[0]
        self._connect_error = ""  # the last reason a connect failed, and when it was logged
        self._connect_logged = 0.0
        self._snapshot_at: float | None = None
        self._stopping = False
        self._deadline: float | None = None  # set when the drain on stop begins
        self._db: Any = None
        self._deleter: Any = None
        # PostgreSQL may be out of reach for a while: its errors close the connection, which
        # is opened again on the next turn (SQLite's errors end the process, as they did)
        self._db_errors: tuple[type[Exception], ...] = ()
        self._db_warned = 0.0
        if settings.store_url is None:
            # reads, and deletes of sent rows: a delete lost in a power cut only means a
            # message is sent again, so it need not wait for the disk
            self._db = db.connect(Path(settings.db_path), "off", db.SMALL_CACHE_KIB)
            # Deletes never wait for the bridge's write lock: when it is busy committing,
            # the ids are kept and deleted with the next ones, instead of SQLite's busy
            # handler sleeping (1, 2, 5, 10 ms...) here while messages wait to be published.
            self._deleter = db.connect(Path(settings.db_path), "off", db.SMALL_CACHE_KIB)
            self._deleter.execute("PRAGMA busy_timeout=0")
        else:
            self._db_errors = db.postgres_errors()
        self._delete_warned = 0.0
        self._published = 0
        # several replicas on PostgreSQL: only the holder of the lease publishes
        self.lease = Lease(settings.store_url) if settings.store_url is not None else None
        self._publishing = False
        self._leaving = False  # stepping down: only `offline`, while no one else can publish
        self._say_online = False  # someone said `offline` for us: say `online` again

        address = settings.address
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from bridge.mqttclient import BufferedClient, write_later

        self._matches = mqtt.topic_matches_sub
        client = BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        # The window is ours (`_send`); paho's own limit would scan every message in
        # flight on each PUBACK (`_update_inflight`: a fifth of this process's CPU at 1,000).
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        # a packet waits for `_wait`'s loop_write, which sends all that are queued at once
        client.on_socket_register_write = write_later
        client.will_set(self.state_topic, b"offline", qos=settings.qos, retain=True)
        if address.username is not None:
            client.username_pw_set(address.username, address.password)
        if address.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish  # QoS 0, through paho's publish()
        client.on_lean_puback = self._acks.append
        client.on_message = self._on_message
        self.client = client

    # -- paho callbacks (called by paho inside `_wait`, on this thread) ----------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            self._connect_delay = min(self._connect_delay * 2, RECONNECT_DELAY[1])
            error = f"the broker refused the connection: {reason}"
            self.status.update(error=error)
            self.status.flush()
            log.error("%s (check mqtt.url's user and password)", error)
            return
        address = self.settings.address
        log.info("connected to the broker at %s:%d", address.host, address.port)
        self._connect_error = ""
        self.connected = True
        self._connect_delay = RECONNECT_DELAY[0]
        self.status.update(connected=True, error=None)
        self.status.flush()
        # what was in flight goes again first, in the order it was sent (paho's own table
        # would have done this for messages sent through its publish())
        for mid, (_, packet) in self._pending.items():
            self.client.queue_again(mid, packet)
        if self.lease is not None:  # a late will of a replica that published before
            # (only then: amqtt, the embedded broker, sends the retained message of a new
            # subscription to every subscriber, whatever their filters)
            client.subscribe(self.state_topic, qos=1)
        if self.settings.birth_topic is not None:
            client.subscribe(self.settings.birth_topic, qos=1)
        for topic_filter in self.settings.commands:
            client.subscribe(topic_filter, qos=1)
        self._snapshot_at = time.monotonic()  # `online` first, then every retained message
        self._wake.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self.connected and not self._stopping:
            log.warning("lost the broker (%s); reconnecting", reason)
        self.connected = False
        self._next_connect = time.monotonic() + self._connect_delay
        self.status.update(connected=False, error=f"disconnected from the broker: {reason}")
        self.status.flush()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        self._acks.append(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.state_topic:
            # While this one publishes, `offline` can only be late news: the last will of
            # a replica that published before (its broker saw it gone only now), or of
            # an earlier run of this one. Said again at once, or it would stand.
            if message.payload != b"online" and not message.retain and not (
                self._stopping or self._leaving
            ):
                log.info("%s said %r while this replica publishes: saying online again",
                         self.state_topic, bytes(message.payload))
                self._say_online = True
            return
        if message.topic == self.settings.birth_topic and message.payload == b"online":
            delay = random.uniform(*BIRTH_DELAY)
            log.info("Home Assistant is online: republishing discovery and state in %.1fs", delay)
            self._snapshot_at = time.monotonic() + delay
            self._wake.set()
            return
        # a retained command would come again on every reconnect: only live ones count
        if not message.retain and any(
            self._matches(pattern, message.topic) for pattern in self.settings.commands
        ):
            self.status.command(message.topic, bytes(message.payload))

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Publish until asked to stop (or the webhook process is gone), then say offline."""
        if self.lease is None:
            self._begin_publishing()
        else:
            self.lease.start()
            threading.Thread(target=self._watch_lease, name="publisher-watchdog",
                             daemon=True).start()
        threading.Thread(target=self._listen, name="publisher-control", daemon=True).start()
        try:
            while not self._stop.is_set():
                self._step()
                self.status.flush()
            self._drain(self.drain_seconds)
        finally:
            self._stopping = True
            self._take_acks()
            self._flush_done()
            if self.connected:
                mid = self._send(Message(self.state_topic, b"offline", True), None)
                deadline = time.monotonic() + 2.0
                while self.connected and mid in self._pending and time.monotonic() < deadline:
                    self._wait(0.05)
                    self._take_acks()
                self.client.disconnect()
                self.client.loop_write()  # queued like every packet: sent now, or never
            self._publishing = False
            self.status.update(connected=False, publishing=False)
            self.status.flush()
            if self.lease is not None:
                self.lease.stop()  # only now: `offline` came first, then the next replica

    def _begin_publishing(self) -> None:
        """Connect to the broker: this replica publishes from now on."""
        address = self.settings.address
        if self.lease is not None:
            log.info("this replica publishes now")
        self._publishing = True
        self.status.update(publishing=True, lease_error=None,
                           error=f"connecting to {address.host}:{address.port}")
        self.status.flush()
        self.client.connect_async(address.host, address.port, self.settings.keepalive)

    def _stand_by(self) -> None:
        """Another replica publishes (or none can, yet): wait for the lease. No broker
        connection meanwhile: the broker sees one bridge, with one last will."""
        assert self.lease is not None
        if self.lease.holds():
            self._begin_publishing()
            return
        self.status.update(error=None, lease_error=self.lease.error)
        self._wait(0.25)

    def _step_down(self) -> NoReturn:
        """The lease is lost (the store's connection failed) or ran out (this process
        was paused, or cut off from the store): stop publishing before another replica
        may start. While the lease would still have held, `offline` goes first. Then a
        clean goodbye, so that the broker publishes no last will later, and the process
        exits: the parent starts a new one at once, which waits for the lease again."""
        assert self.lease is not None
        if not self._leaving:
            self._leaving = True
            log.warning("this replica has lost the publisher's lease: it stops publishing")
            if self.connected and self.lease.safe():
                mid = self._send(Message(self.state_topic, b"offline", True), None)
                while mid in self._pending and self.connected and self.lease.safe():
                    self._wait(0.05)  # comes back here (and leaves) if the lease runs out
                    self._take_acks()
        self.client.leave()
        self.status.update(connected=False, publishing=False)
        self.status.flush()
        os._exit(STEPPED_DOWN)

    def _watch_lease(self) -> None:
        """The loop steps down at its gate (`_wait`); but it may be waiting on a store that
        stalled, and its connection to the broker stays open meanwhile. Shortly after the
        lease ran out, this thread ends the process in any case (the broker publishes the
        last will `offline`: true, until the next replica says `online`)."""
        while True:
            time.sleep(WATCH_EVERY)
            if self._publishing and not self._may_write():
                time.sleep(WATCH_GRACE)  # the loop's own, orderly step-down
                if self._publishing and not self._may_write():  # (`offline` may be going out)
                    log.warning("the publisher's lease ran out while its loop was waiting: "
                                "leaving now")
                    os._exit(STEPPED_DOWN)

    def _may_write(self) -> bool:
        """Whether this process may send to the broker now."""
        lease = self.lease
        if lease is None or not self._publishing:
            return True
        return lease.safe() if self._leaving else lease.holds()

    def _listen(self) -> None:
        """Read the parent's stop request (`S<seconds>`) on stdin. End of input
        means the parent is gone (even kill -9): leave at once, without DISCONNECT, so the
        broker publishes the last will `offline`."""
        fd = self.control.fileno()
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                os._exit(0)
            if b"S" in data:
                with contextlib.suppress(ValueError):
                    self.drain_seconds = float(data.rsplit(b"S", 1)[1].split(b"\n")[0])
                self._stop.set()
            self._wake.set()

    def _step(self) -> None:
        if not self._publishing:
            self._stand_by()
            return
        self._wait(0)  # what the broker sent meanwhile: acknowledgements, mostly
        self._take_acks()
        if not self.connected:
            self._flush_done()
            self._wait(0.5)
            return
        if self._db is None and not self._connect_store():
            self._wait(0.5)
            return
        if self._say_online:
            self._say_online = False
            self._send(Message(self.state_topic, b"online", True), None)
        snapshot_at = self._snapshot_at
        try:
            if snapshot_at is not None and time.monotonic() >= snapshot_at:
                self._snapshot_at = None
                self._publish_snapshot()
            rows = outbox.read_outbox(self._db, self._cursor, READ_BATCH)
        except self._db_errors as exc:
            if snapshot_at is not None and self._snapshot_at is None:
                self._snapshot_at = time.monotonic()  # all of it again, once it is back
            self._store_lost(exc)
            self._wait(0.5)
            return
        if rows:
            self._publish_rows(rows)
            return
        if time.monotonic() - self._flushed_at >= DELETE_EVERY:
            self._flush_done()
        self._wait(0.25 if self._snapshot_at is None else 0.05)

    def _connect_store(self) -> bool:
        """(Re)connect to PostgreSQL: one autocommit connection reads the outbox and deletes
        what was sent (this loop is its only user)."""
        assert self.settings.store_url is not None
        try:
            self._db = self._deleter = db.connect_postgres(
                self.settings.store_url, "esim-bridge-publisher")
        except self._db_errors as exc:
            self._store_lost(exc)
            return False
        log.info("connected to the store")
        return True

    def _store_lost(self, exc: Exception) -> None:
        """A PostgreSQL error: drop the connection, say so now and then, reconnect later.
        Messages in flight keep their rows; only their deletes wait (at-least-once)."""
        conn, self._db, self._deleter = self._db, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        if time.monotonic() - self._db_warned > 10:
            self._db_warned = time.monotonic()
            log.warning("cannot read the outbox from the store: %s; trying again", exc)

    def _wait(self, timeout: float) -> None:
        """Wait up to `timeout` for a poke from the parent or for the broker, then let paho
        read what arrived (PUBACKs call `_on_publish`), write what it queued and ping."""
        client = self.client
        sock = client.socket()
        if sock is None and self._publishing:
            self._connect_when_due()
            sock = client.socket()
        readable: list[Any] = [self._wake]
        if self._pokes is not None:
            readable.append(self._pokes)
        if sock is not None:
            readable.append(sock)
        writable = [sock] if sock is not None and client.want_write() else []
        try:
            ready, _, _ = select.select(readable, writable, [], timeout)
        except (OSError, ValueError):  # the socket was closed under us
            ready = []
        # The one gate before anything is sent (loop_write below; loop_read can answer
        # too): a replica whose lease has run out sends nothing more. After select, since
        # the wait may be long enough for it to run out.
        if not self._may_write():
            self._step_down()
        if self._wake in ready:
            self._wake.clear()
        if self._pokes is not None and self._pokes in ready:
            self._take_pokes(self._pokes)
        if sock is None or client.socket() is not sock:
            return
        if sock in ready:
            client.loop_read()
        if client.want_write():
            client.loop_write()
        client.loop_misc()  # keepalive: a PINGREQ when due, and a dead connection noticed

    def _take_pokes(self, fd: int) -> None:
        """Empty the poke pipe: any number of pokes means one thing, read the outbox."""
        try:
            while os.read(fd, 4096):
                pass
            self._pokes = None  # end of file: the parent is gone, and _listen sees it too
        except BlockingIOError:
            pass
        except OSError:
            self._pokes = None

    def _connect_when_due(self) -> None:
        """(Re)connect once the back-off allows: 1 s after a failure, doubling to 10 s."""
        now = time.monotonic()
        if now < self._next_connect:
            return
        address = self.settings.address
        try:
            self.client.reconnect()  # to the address connect_async() stored
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS, DNS
            self._next_connect = now + self._connect_delay
            error = f"cannot connect to the broker at {address.host}:{address.port}: {exc}"
            # in the log too, where a typo in mqtt.url is looked for: when the reason is
            # new, then once a minute while it lasts (a retry is every 10 s at the most)
            if error != self._connect_error or now - self._connect_logged >= CONNECT_LOG_EVERY:
                log.warning("%s; trying again in %.0f s (check mqtt.url)", error,
                            self._connect_delay)
                self._connect_error, self._connect_logged = error, now
            self._connect_delay = min(self._connect_delay * 2, RECONNECT_DELAY[1])
            self.status.update(error=error)
            self.status.flush()

    def _drain(self, seconds: float) -> None:
        """On stop: keep sending until the outbox is empty, or `seconds` have passed."""
        deadline = self._deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.connected:
            self._step()
            self._take_acks()
            self._flush_done()
            if not self._pending and self._outbox_empty():
                return
        left = 0
        if self._db is not None:
            try:
                left = outbox.backlog(self._db)
            except self._db_errors as exc:
                self._store_lost(exc)
        if left:
            log.warning("stopping with %d messages still in the outbox; they are sent on the "
                        "next start", left)

    def _outbox_empty(self) -> bool:
        if self._db is None:
            return False
        try:
            return not outbox.read_outbox(self._db, 0, 1)
        except self._db_errors as exc:
            self._store_lost(exc)
            return False

    def _publish_rows(self, rows: list[tuple[int, Message]]) -> None:
        """Send a batch in order, every message of it."""
        for row_id, msg in rows:
            self._cursor = row_id
            self._send(msg, row_id)
        if len(self._done) >= ACK_FLUSH:
            self._flush_done()

    def _publish_snapshot(self) -> None:
        count = 0
        self._send(Message(self.state_topic, b"online", True), None)
        for msg in outbox.snapshot(self._db, self._cursor):
            if not self.connected:
                return
            self._send(msg, None)
            count += 1
        log.info("republished %d retained messages", count)

    def _send(self, msg: Message, row_id: int | None) -> int | None:
        """Queue one message for the broker; its message id while it waits for a PUBACK."""
        while len(self._pending) >= self.settings.window and self.connected:
            if self._stop.is_set() and (
                self._deadline is None or time.monotonic() >= self._deadline
            ):
                break  # stopping, and a stalled broker must not hold the exit up
            self._wait(0.1)
            self._take_acks()
        if self.settings.qos == 0:
            self.client.publish(msg.topic, msg.payload, qos=0, retain=msg.retain)
            if row_id is not None:
                self._done.append(row_id)
            self._count(1)
            return None
        mid = self._next_mid()
        packet = self.client.queue_publish(mid, msg.topic.encode(), msg.payload, msg.retain)
        self._pending[mid] = (row_id, packet)
        return mid

    def _next_mid(self) -> int:
        """A message id (1 to 65535) that no message in flight has."""
        mid = self._mid
        while True:
            mid = mid % 65535 + 1
            if mid not in self._pending:
                self._mid = mid
                return mid

    def _count(self, n: int) -> None:
        self._published += n
        self.status.update(published=self._published)

    def _take_acks(self) -> None:
        acked = 0
        while self._acks:
            mid = self._acks.popleft()
            if mid not in self._pending:
                continue
            row_id, _ = self._pending.pop(mid)
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
        if not self._done or self._deleter is None:
            return
        try:
            outbox.delete_outbox(self._deleter, self._done)
        except sqlite3.OperationalError as exc:
            if not db.is_busy(exc) and time.monotonic() - self._delete_warned > 10:
                self._delete_warned = time.monotonic()
                log.warning("could not delete %d sent messages from the outbox yet: %s",
                            len(self._done), exc)
            return
        except sqlite3.Error as exc:
            log.warning("could not delete sent messages from the outbox: %s", exc)
            return
        except self._db_errors as exc:
            self._store_lost(exc)
            return
        self._done = []
        self._flushed_at = time.monotonic()


def main() -> None:
    """`python -m bridge.publisher [POKE_FD]`: the first line on stdin is the settings
    (JSON); POKE_FD, the read end of the pipe the parent pokes after each commit."""
    settings = msgspec.json.decode(sys.stdin.buffer.readline(), type=Settings)
    configure_logging(settings.log_level)
    status = StatusWriter(sys.stdout.buffer)
    pokes = int(sys.argv[1]) if len(sys.argv) > 1 else None
    if pokes is not None:
        os.set_blocking(pokes, False)
    try:
        Publisher(settings, status, sys.stdin.buffer, pokes).run()
    except Exception:
        log.exception("the publisher failed")
        raise


class PublisherProcess:
    """The webhook process's handle on the publisher: start, poke, read status, stop.

    A publisher that exits on its own (a bug, the OOM killer) is started again, after 1 s
    and then longer (up to 30 s) while it keeps dying; meanwhile /readyz says why, and
    the outbox keeps every message for it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = settings.address
        self.status = Status(error="not started")
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()  # starting again, against stopping
        self._stopping = threading.Event()
        self._published_before = 0  # by the processes that came before this one
        self._restart_delay = RESTART_DELAY[0]
        # A byte per commit wakes the publisher. A pipe of its own, which the publisher's
        # loop waits on directly: through stdin, a thread had to read each byte and wake
        # the loop in turn (8 % of the publisher's CPU). One pipe for every publisher
        # process this handle starts, so that poke() never races a restart.
        self._pokes = os.pipe()
        os.set_blocking(self._pokes[1], False)
        self._poke_lock = threading.Lock()  # poke() against closing the pipe in stop()
        self._commands: list[Callable[[str, bytes], None]] = []

    def on_command(self, listener: Callable[[str, bytes], None]) -> None:
        """Call `listener(topic, payload)` (on a thread of its own) for each command."""
        self._commands.append(listener)

    def start(self) -> None:
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        pokes = self._pokes[0]
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.publisher", str(pokes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches the bridge, which stops us in order
            pass_fds=(pokes,),
        )
        assert proc.stdin is not None
        proc.stdin.write(msgspec.json.encode(self.settings) + b"\n")  # secrets stay off argv
        proc.stdin.flush()
        os.set_blocking(proc.stdin.fileno(), False)
        self._proc = proc
        self._reader = threading.Thread(target=self._read_status, args=(proc,),
                                        name="publisher-status", daemon=True)
        self._reader.start()

    def _read_status(self, proc: subprocess.Popen[bytes]) -> None:
        """Follow one publisher process's status until it exits; then start another,
        unless we are stopping."""
        assert proc.stdout is not None
        started = time.monotonic()
        decoder = msgspec.json.Decoder(Line)
        for line in proc.stdout:
            try:
                said = decoder.decode(line)
            except msgspec.DecodeError:
                continue
            if isinstance(said, Command):
                for listener in self._commands:
                    listener(said.topic, said.payload)
            else:
                self.status = said
        code = proc.wait()
        error = f"the publisher process exited ({code}); see the log"
        self.status = Status(published=self.status.published, error=error)
        if self._stopping.is_set():
            return
        if code == STEPPED_DOWN:  # another replica publishes now: wait for the lease again
            delay = 0.0
            self.status = Status(published=self.status.published, error="stepped down")
        else:
            if time.monotonic() - started >= RESTART_RESET:
                self._restart_delay = RESTART_DELAY[0]
            delay = self._restart_delay
            self._restart_delay = min(delay * 2, RESTART_DELAY[1])
            log.error("the publisher process exited (%s); starting it again in %.0f s",
                      code, delay)
            self.status = Status(published=self.status.published,
                                 error=f"{error}; starting it again in {delay:.0f} s")
        if self._stopping.wait(delay):
            return
        with self._lock:
            if self._stopping.is_set():
                return
            self._published_before += self.status.published
            self.status = Status(error="starting the publisher again")
            self._spawn()

    def poke(self) -> None:
        """New rows are in the outbox (called by the store's writer after a commit). A full
        pipe means the publisher has pokes enough waiting."""
        with self._poke_lock:
            if self._pokes[1] >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._pokes[1], b"\n")

    @property
    def connected(self) -> bool:
        return self.status.connected

    @property
    def publishing(self) -> bool:
        """This replica publishes (always, on SQLite, once the process runs)."""
        return self.status.publishing

    @property
    def published(self) -> int:
        return self._published_before + self.status.published

    @property
    def last_error(self) -> str | None:
        return self.status.error

    def stop(self, drain_seconds: float) -> None:
        """Drain for up to `drain_seconds`, publish `offline`, disconnect, exit."""
        self._stopping.set()
        with self._lock:
            self._stop(drain_seconds)
        with self._poke_lock:
            for fd in self._pokes:
                if fd >= 0:
                    os.close(fd)
            self._pokes = (-1, -1)

    def _stop(self, drain_seconds: float) -> None:
        proc = self._proc
        if proc is None:
            return
        assert proc.stdin is not None
        os.set_blocking(proc.stdin.fileno(), True)
        with contextlib.suppress(OSError):
            proc.stdin.write(f"S{drain_seconds}\n".encode())
            proc.stdin.flush()
        try:
            proc.wait(drain_seconds + 10)
        except subprocess.TimeoutExpired:
            log.warning("the publisher did not stop in time; terminating it")
            proc.kill()
            proc.wait(5)
        with contextlib.suppress(OSError):
            proc.stdin.close()
        if self._reader is not None:
            self._reader.join(2)
        self._proc = None


if __name__ == "__main__":
    main()
