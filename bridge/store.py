"""The embedded store (SQLite): dedup, state and the outbox, written in one transaction.

One writer thread owns every write. Webhooks that arrive together are
committed together (group commit), so the fsync that makes an acknowledgement
durable is paid once per batch, not once per webhook. A webhook's future
resolves only after its COMMIT: that is the moment the HTTP layer may answer 200.

Tables:
- `seen`: notify ids (or body hashes) with the time they were first accepted;
- `entity`: one `Record` per eSIM, order and the bridge (the merged state);
- `outbox`: finished MQTT messages in the order they must leave;
- `discovery`: the Home Assistant configs last sent, to send only changes.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import msgspec

from bridge import topics
from bridge.models import Decoded
from bridge.topics import Message, Record

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entity (key TEXT PRIMARY KEY, record BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS discovery (topic TEXT PRIMARY KEY, payload BLOB NOT NULL)
    WITHOUT ROWID;
"""

BATCH_LIMIT = 512
CLEANUP_EVERY = 600.0

Discovery = Callable[[str, Record], list[Message]]
"""Given an entity key and its record, the retained discovery messages it should have."""

_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Record)


class StoreUnavailable(Exception):
    """The store cannot write right now (disk full, locked, closed): answer 503."""


class OutboxFull(StoreUnavailable):
    """The outbox holds `store.max_outbox` messages that the broker has not taken yet."""


@dataclass(frozen=True, slots=True)
class Accepted:
    duplicate: bool
    iccid: str | None = None
    warning: str | None = None
    messages: int = 0


@dataclass(slots=True)
class _Ingest:
    decoded: Decoded
    body: bytes
    received_at: datetime
    future: Future[Accepted] = field(default_factory=Future)


@dataclass(slots=True)
class _Call:
    """Run a function on the writer connection inside a transaction (maintenance work)."""

    fn: Callable[[sqlite3.Connection], int]
    """Does its work and returns how many outbox rows it added."""
    future: Future[int] = field(default_factory=Future)


_STOP = object()


def dedup_key(decoded: Decoded, body: bytes) -> str:
    if decoded.notify_id:
        return "id:" + decoded.notify_id
    return "sha256:" + hashlib.sha256(body).hexdigest()


def connect(path: Path, synchronous: str = "full") -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class Store:
    """The SQLite store. `open()` starts the writer thread; `close()` stops it."""

    def __init__(
        self,
        path: Path,
        *,
        base: str,
        dedup_hours: float = 72.0,
        max_outbox: int = 1_000_000,
        synchronous: str = "full",
        discovery: Discovery | None = None,
    ) -> None:
        self.path = path
        self.base = base
        self.dedup_seconds = dedup_hours * 3600
        self.max_outbox = max_outbox
        self.synchronous = synchronous
        self.discovery = discovery
        self.backlog = 0
        self.esims = 0
        self.last_error: str | None = None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path, self.synchronous)
        conn.executescript(SCHEMA)
        self.backlog = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        self.esims = conn.execute(
            "SELECT count(*) FROM entity WHERE key LIKE 'esim:%'"
        ).fetchone()[0]
        self._conn = conn
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(10)
        self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def reader(self) -> sqlite3.Connection:
        """A connection for another thread to read with (WAL lets reads run beside writes)."""
        return connect(self.path, self.synchronous)

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from the writer thread) after a commit added to the outbox."""
        self._listeners.append(listener)

    # -- the writer's API --------------------------------------------------------------------

    def submit(self, decoded: Decoded, body: bytes, received_at: datetime) -> Future[Accepted]:
        """Queue one webhook; the future resolves after its transaction commits."""
        item = _Ingest(decoded, body, received_at)
        if self._thread is None:
            item.future.set_exception(StoreUnavailable("the store is closed"))
        else:
            self._queue.put(item)
        return item.future

    def ingest(self, decoded: Decoded, body: bytes, received_at: datetime) -> Accepted:
        """Blocking `submit`, for callers outside the event loop."""
        return self.submit(decoded, body, received_at).result()

    def delete(self, ids: list[int]) -> None:
        """Drop messages the broker acknowledged. Queued: it rides with the next batch."""
        if ids:
            self._queue.put(ids)

    def call(self, fn: Callable[[sqlite3.Connection], int]) -> int:
        """Run `fn` in a write transaction on the writer thread; it returns outbox rows added."""
        item = _Call(fn)
        if self._thread is None:
            raise StoreUnavailable("the store is closed")
        self._queue.put(item)
        return item.future.result()

    # -- reads (any thread, with its own connection) ----------------------------------------

    @staticmethod
    def read_outbox(conn: sqlite3.Connection, after: int, limit: int) -> list[tuple[int, Message]]:
        rows = conn.execute(
            "SELECT id, topic, payload, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        ).fetchall()
        return [(row[0], Message(row[1], bytes(row[2]), bool(row[3]))) for row in rows]

    @staticmethod
    def iter_snapshot(conn: sqlite3.Connection, base: str) -> Iterator[Message]:
        """Every retained message the store stands for: discovery first, then state."""
        for topic, payload in conn.execute("SELECT topic, payload FROM discovery").fetchall():
            yield Message(topic, bytes(payload), True)
        cursor = conn.execute("SELECT key, record FROM entity")
        while rows := cursor.fetchmany(500):
            for key, blob in rows:
                yield from topics.snapshot(key, _record_decoder.decode(blob), base)

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        assert self._conn is not None
        conn = self._conn
        next_cleanup = 0.0
        while True:
            try:
                first = self._queue.get(timeout=30)
            except queue.Empty:
                first = None
            batch: list[object] = [] if first is None else [first]
            while len(batch) < BATCH_LIMIT:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in batch
            batch = [item for item in batch if item is not _STOP]
            if time.monotonic() >= next_cleanup:
                next_cleanup = time.monotonic() + CLEANUP_EVERY
                self._cleanup(conn)
            if batch:
                self._write(conn, batch)
            if stop:
                self._drain_after_stop()
                return

    def _drain_after_stop(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Ingest | _Call):
                item.future.set_exception(StoreUnavailable("the store is closing"))

    def _cleanup(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("DELETE FROM seen WHERE at < ?", (time.time() - self.dedup_seconds,))
        except sqlite3.Error as exc:
            log.warning("could not forget old notify ids: %s", exc)

    def _write(self, conn: sqlite3.Connection, batch: list[object]) -> None:
        ingests = [item for item in batch if isinstance(item, _Ingest)]
        calls = [item for item in batch if isinstance(item, _Call)]
        deletes = [ids for item in batch if isinstance(item, list) for ids in item]
        results: list[Accepted | BaseException] = []
        call_results: list[int] = []
        added = 0
        deleted = 0
        new_esims = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            records: dict[str, Record | None] = {}
            for item in ingests:
                conn.execute("SAVEPOINT one")
                try:
                    result, count, new = self._ingest_one(conn, item, records, added)
                except sqlite3.Error:
                    raise  # the whole transaction is in doubt: fail the batch
                except Exception as exc:  # a bug for this body only: keep the others
                    conn.execute("ROLLBACK TO one")
                    log.exception("could not store a %s webhook", item.decoded.notify_type)
                    results.append(exc)
                    continue
                finally:
                    conn.execute("RELEASE one")
                results.append(result)
                added += count
                new_esims += new
            for call in calls:
                call_results.append(call.fn(conn))
            if deletes:
                deleted = conn.executemany(
                    "DELETE FROM outbox WHERE id = ?", [(i,) for i in deletes]
                ).rowcount
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rollback failed")
            self.last_error = f"the store cannot write: {exc}"
            log.error("%s (%d webhooks answered 503)", self.last_error, len(ingests))
            failure = StoreUnavailable(self.last_error)
            for item in ingests:
                item.future.set_exception(failure)
            for call in calls:
                call.future.set_exception(exc)
            if deletes:
                self._queue.put(deletes)  # try again with the next batch
            return
        self.last_error = None
        added += sum(call_results)
        self.backlog += added - deleted
        self.esims += new_esims
        for item, outcome in zip(ingests, results, strict=True):
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
        for call, value in zip(calls, call_results, strict=True):
            call.future.set_result(value)
        if added:
            for listener in self._listeners:
                listener()

    def _load(self, conn: sqlite3.Connection, key: str) -> Record | None:
        row = conn.execute("SELECT record FROM entity WHERE key = ?", (key,)).fetchone()
        return None if row is None else _record_decoder.decode(row[0])

    def _ingest_one(
        self,
        conn: sqlite3.Connection,
        item: _Ingest,
        records: dict[str, Record | None],
        pending: int,
    ) -> tuple[Accepted | BaseException, int, int]:
        """Store one webhook inside the open transaction: (result, outbox rows, new eSIMs)."""
        decoded = item.decoded
        key = dedup_key(decoded, item.body)
        now = item.received_at.timestamp()
        row = conn.execute("SELECT at FROM seen WHERE key = ?", (key,)).fetchone()
        if row is not None and row[0] >= now - self.dedup_seconds:
            return Accepted(duplicate=True), 0, 0
        if self.backlog + pending >= self.max_outbox:
            return (
                OutboxFull(
                    f"the outbox is full ({self.backlog + pending} messages wait for the "
                    "broker): check the broker, or raise store.max_outbox"
                ),
                0,
                0,
            )
        conn.execute("INSERT OR REPLACE INTO seen (key, at) VALUES (?, ?)", (key, now))

        entity = topics.entity_key(decoded)
        prior: Record | None = None
        if entity is not None:
            prior = records[entity] if entity in records else self._load(conn, entity)
        result = topics.plan(decoded, item.body, prior, item.received_at, self.base)
        messages = result.messages
        new_esim = 0
        if result.entity is not None and result.record is not None:
            records[result.entity] = result.record
            conn.execute(
                "INSERT OR REPLACE INTO entity (key, record) VALUES (?, ?)",
                (result.entity, _record_encoder.encode(result.record)),
            )
            if prior is None and result.entity.startswith("esim:"):
                new_esim = 1
            if self.discovery is not None:
                messages = self._changed_discovery(conn, result.entity, result.record) + messages
        conn.executemany(
            "INSERT INTO outbox (topic, payload, retain) VALUES (?, ?, ?)",
            [(m.topic, m.payload, int(m.retain)) for m in messages],
        )
        accepted = Accepted(False, result.iccid, result.warning, len(messages))
        return accepted, len(messages), new_esim

    def _changed_discovery(
        self, conn: sqlite3.Connection, entity: str, record: Record
    ) -> list[Message]:
        """The discovery messages whose payload differs from what was sent last."""
        assert self.discovery is not None
        changed = []
        for message in self.discovery(entity, record):
            row = conn.execute(
                "SELECT payload FROM discovery WHERE topic = ?", (message.topic,)
            ).fetchone()
            if row is not None and bytes(row[0]) == message.payload:
                continue
            conn.execute(
                "INSERT OR REPLACE INTO discovery (topic, payload) VALUES (?, ?)",
                (message.topic, message.payload),
            )
            changed.append(message)
        return changed

    # -- maintenance, run through `call` ------------------------------------------------------

    def sync_discovery(self, bridge_config: list[Message]) -> int:
        """Bring discovery in line with the current settings; returns messages queued.

        With discovery on, every entity's config is recomputed (a new version may
        change it) and only changes are queued; configs no longer wanted (another
        prefix, discovery off) are removed with empty retained payloads.
        """

        def work(conn: sqlite3.Connection) -> int:
            wanted: dict[str, bytes] = {m.topic: m.payload for m in bridge_config}
            if self.discovery is not None:
                cursor = conn.execute("SELECT key, record FROM entity")
                for key, blob in cursor.fetchall():
                    for message in self.discovery(key, _record_decoder.decode(blob)):
                        wanted[message.topic] = message.payload
            sent = dict(conn.execute("SELECT topic, payload FROM discovery").fetchall())
            out: list[Message] = []
            for topic in sent.keys() - wanted.keys():
                out.append(Message(topic, b"", True))
                conn.execute("DELETE FROM discovery WHERE topic = ?", (topic,))
            for topic, payload in wanted.items():
                if sent.get(topic) != payload:
                    out.append(Message(topic, payload, True))
                    conn.execute(
                        "INSERT OR REPLACE INTO discovery (topic, payload) VALUES (?, ?)",
                        (topic, payload),
                    )
            conn.executemany(
                "INSERT INTO outbox (topic, payload, retain) VALUES (?, ?, ?)",
                [(m.topic, m.payload, int(m.retain)) for m in out],
            )
            return len(out)

        return self.call(work)
