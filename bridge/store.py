"""The embedded store (SQLite): dedup, state and the outbox, written in one transaction.

Webhooks that arrive together share one transaction (group commit), so the fsync that
makes an acknowledgement durable is paid once per batch. The batch's statements run on
the event loop's own thread; only its COMMIT runs on a committer thread, so the loop
goes on serving requests (the next batch) during the fsync, and the GIL changes hands
once per batch, not once per SQLite statement; a batch of one or two (light load)
commits on the loop itself, where the handoff would cost more than it saves. A
webhook's future resolves only after its COMMIT: that is the moment the HTTP layer may
answer 200.

Checkpoints (copying the WAL into the database) and forgetting old notify ids run
on a small maintenance thread, so a commit never pays for a checkpoint.

Tables:
- `seen`: notify ids (or body hashes) with the time they were first accepted;
- `entity`: one `Record` per eSIM, order and the bridge (the merged state);
- `outbox`: finished MQTT messages in the order they must leave;
- `discovery`: the Home Assistant configs last sent, to send only changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec

from bridge import topics
from bridge.models import Decoded
from bridge.topics import Message, Record

if TYPE_CHECKING:  # the publisher process imports this module and needs no asyncio
    import asyncio

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_at ON seen (at);
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
# A batch of this many webhooks or fewer commits on the loop's own thread. So small a
# batch means the loop has little else to do meanwhile, and the committer thread would
# cost two GIL handoffs (0.3 ms at the median, over 1 ms at the 90th percentile, at
# 500 webhooks/s): the median acknowledgement at 500/s fell from 2.0-2.7 to 1.6-2.1 ms.
INLINE_COMMIT = 2
WRITE_BUSY = 0.25  # s: longest wait for another writer (publisher delete, cleanup)
BLOCKING_BUSY = 5.0  # s: the same, for the blocking writes (startup, tools)
CLEANUP_EVERY = 600.0
CHECKPOINT_EVERY = 0.1  # s: small checkpoints, so the database's fsync is small too
# New databases use 1 KB pages. A commit writes each page it touched whole, to the WAL
# and later again into the database; one webhook touches ~10 pages (outbox, dedup,
# state, indexes): 13 KB per acknowledgement at 1 KB against 29 KB at SQLite's default
# 4 KB. Less to fsync, fewer stalls on a busy disk, less wear on an SD card.
PAGE_SIZE = 1024
RESTART_FRAMES = 1000  # WAL pages (of PAGE_SIZE in a new database) before it starts over
RESTART_BUSY = 0.02  # s
SMALL_CACHE_KIB = 256  # page cache of the connections that only look things up


@dataclass(frozen=True)
class Discovery:
    """How an entity's retained discovery messages follow from its record.

    `messages(key, record)`: the messages it should have. `inputs(key, record)`: the part
    of the record they are made from; when an event leaves it as it was, the messages
    are as they were, and the store skips making them and comparing them with the table
    (an eSIM's config is 5 KB of JSON: ~100 µs a webhook, a quarter of its store work).
    """

    messages: Callable[[str, Record], list[Message]]
    inputs: Callable[[str, Record], object]


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
    warning: str | None = None  # why it was published raw
    messages: int = 0
    notice: str | None = None  # something odd about it, though understood


@dataclass(frozen=True, slots=True)
class _Ingest:
    decoded: Decoded
    body: bytes
    received_at: datetime


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A batch written but not yet committed."""

    results: list[Accepted | BaseException]
    added: int
    new_esims: int


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the lock (SQLITE_BUSY or _LOCKED, any extended code):
    nothing is wrong, try again later."""
    return exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _begin_blocking(conn: sqlite3.Connection, timeout: float = BLOCKING_BUSY) -> None:
    """BEGIN IMMEDIATE on a connection whose busy handler is off, waiting up to `timeout`
    for another writer: for the writes that are allowed to block (startup, tools)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.001)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rollback failed")


def dedup_key(decoded: Decoded, body: bytes) -> str:
    if decoded.notify_id:
        return "id:" + decoded.notify_id
    return "sha256:" + hashlib.sha256(body).hexdigest()


def connect(path: Path, synchronous: str = "full", cache_kib: int = 2000) -> sqlite3.Connection:
    """A connection in WAL mode. `synchronous`: full (survives a power cut), normal
    (survives a crash of the process), off (for writes that may be lost, like deleting
    sent messages: a lost delete only means a message is sent again). `cache_kib`: its
    page cache (SQLite's default 2,000 KiB suits the writer; the helpers need little)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute(f"PRAGMA cache_size=-{cache_kib}")
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a new database only
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # the maintenance thread checkpoints
    conn.execute("PRAGMA journal_size_limit=67108864")
    return conn


def _insert_outbox(conn: sqlite3.Connection, messages: list[Message]) -> None:
    conn.executemany(
        "INSERT INTO outbox (topic, payload, retain) VALUES (?, ?, ?)",
        [(m.topic, m.payload, int(m.retain)) for m in messages],
    )


# -- the outbox, as the publisher process sees it (its own connection) -----------------------


def read_outbox(conn: sqlite3.Connection, after: int, limit: int) -> list[tuple[int, Message]]:
    rows = conn.execute(
        "SELECT id, topic, payload, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
        (after, limit),
    )  # iterated, not fetched first: one copy of up to `limit` payloads in memory, not two
    return [(row[0], Message(row[1], row[2], bool(row[3]))) for row in rows]


def runs(ids: list[int]) -> list[tuple[int, int]]:
    """Consecutive ids as (first, last) ranges: [1, 2, 3, 7, 8] -> [(1, 3), (7, 8)].

    The ids are nearly always one run with a few holes, so instead of a Python step per
    id (~0.5 µs each, 17,000 a second), a span of the sorted unique ids without a hole
    is recognised by its ends (last - first == its length - 1) and only spans with a
    hole are halved: a step per hole and halving, 15x faster for 300 ids in one run."""
    ordered = sorted(set(ids))
    out: list[tuple[int, int]] = []
    spans = [(0, len(ordered) - 1)] if ordered else []
    while spans:
        lo, hi = spans.pop()
        first, last = ordered[lo], ordered[hi]
        if last - first == hi - lo:  # no hole inside
            if out and out[-1][1] + 1 == first:  # continues the range before it
                out[-1] = (out[-1][0], last)
            else:
                out.append((first, last))
        else:
            mid = (lo + hi) // 2
            spans += [(mid + 1, hi), (lo, mid)]  # the lower half is taken first
    return out


RANGES_PER_DELETE = 200


def delete_outbox(conn: sqlite3.Connection, ids: list[int]) -> None:
    """Drop rows the broker acknowledged. Acknowledgements come in order, so the ids are
    a few ranges, deleted in one statement (per 200 ranges) in autocommit: SQLite takes
    the write lock, deletes and commits inside that one call. A transaction spanning
    several calls would hold the lock, which the webhook side waits for, while this
    process waits for its GIL between the calls (paho's thread has it): milliseconds.
    (A lost delete only means a message is sent again: at-least-once.)"""
    ranges = runs(ids)
    for start in range(0, len(ranges), RANGES_PER_DELETE):
        chunk = ranges[start:start + RANGES_PER_DELETE]
        where = " OR ".join(["id BETWEEN ? AND ?"] * len(chunk))
        conn.execute(f"DELETE FROM outbox WHERE {where}", [i for pair in chunk for i in pair])


def backlog(conn: sqlite3.Connection) -> int:
    """Messages waiting in the outbox: the id range, which is cheap at any size. Rows are
    deleted in the order they were acknowledged, so holes are few and short-lived."""
    # two subqueries: SQLite answers a lone min() or max() from the index, both at once
    # in one SELECT with a full scan
    low, high = conn.execute(
        "SELECT (SELECT min(id) FROM outbox), (SELECT max(id) FROM outbox)"
    ).fetchone()
    return 0 if low is None else int(high - low + 1)


def iter_snapshot(conn: sqlite3.Connection, base: str) -> Iterator[Message]:
    """Every retained message the store stands for: discovery first, then state."""
    for topic, payload in conn.execute("SELECT topic, payload FROM discovery").fetchall():
        yield Message(topic, bytes(payload), True)
    rows = conn.execute("SELECT key, record FROM entity").fetchall()
    for key, blob in rows:
        yield from topics.snapshot(key, _record_decoder.decode(blob), base)


class Store:
    """The SQLite store. `open()` before use, `close()` after."""

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
        self.esims = 0
        self.last_error: str | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one writer at a time: the loop, or startup work
        self._listeners: list[Callable[[], None]] = []
        self._pending: list[tuple[_Ingest, asyncio.Future[Accepted]]] = []
        self._extra: list[Message] = []
        self._flush_scheduled = False
        self._busy_since: float | None = None
        self._committing = False
        self._committer: ThreadPoolExecutor | None = None
        self._stopping = threading.Event()
        self._maintenance: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path, self.synchronous)
        conn.executescript(SCHEMA)
        self.esims = conn.execute(
            "SELECT count(*) FROM entity WHERE key LIKE 'esim:%'"
        ).fetchone()[0]
        # The event loop writes on this connection, so SQLite's busy handler must never
        # sleep on it (1 ms at the least, while no request is served): `_flush` tries
        # again on a later turn of the loop instead, and answers 503 after WRITE_BUSY.
        conn.execute("PRAGMA busy_timeout=0")
        self._conn = conn
        self._reader = connect(self.path, self.synchronous, SMALL_CACHE_KIB)
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="store-commit")
        self._stopping.clear()
        self._maintenance = threading.Thread(
            target=self._maintain, name="store-maintenance", daemon=True
        )
        self._maintenance.start()

    def close(self) -> None:
        if self._conn is None:
            return
        self._stopping.set()
        if self._maintenance is not None:
            self._maintenance.join(10)
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None
        with self._lock:
            for conn in (self._conn, self._reader):
                if conn is not None:
                    conn.close()
            self._conn = self._reader = None

    @property
    def alive(self) -> bool:
        return self._conn is not None and (
            self._maintenance is not None and self._maintenance.is_alive()
        )

    @property
    def backlog(self) -> int:
        """Messages in the outbox that the broker has not acknowledged yet."""
        if self._reader is None:
            return 0
        try:
            return backlog(self._reader)
        except sqlite3.Error:
            return 0

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call `listener` after a commit that added to the outbox."""
        self._listeners.append(listener)

    # -- writing -----------------------------------------------------------------------------

    def submit_async(
        self, decoded: Decoded, body: bytes, received_at: datetime
    ) -> asyncio.Future[Accepted]:
        """Store one webhook with whatever else arrives meanwhile; the future resolves after
        its COMMIT (or fails with StoreUnavailable)."""
        import asyncio

        loop = asyncio.get_running_loop()
        future: asyncio.Future[Accepted] = loop.create_future()
        self._pending.append((_Ingest(decoded, body, received_at), future))
        self._schedule(loop)
        return future

    def append_async(self, messages: list[Message]) -> None:
        """Append finished messages (bridge/info, for instance) with the next batch."""
        import asyncio

        self._extra.extend(messages)
        self._schedule(asyncio.get_running_loop())

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._flush_scheduled and not self._committing:
            self._flush_scheduled = True
            loop.call_soon(self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write a batch on the loop, then COMMIT it on the committer thread: the loop goes
        on serving requests during the fsync, and they form the next batch meanwhile."""
        self._flush_scheduled = False
        if self._committing or not (self._pending or self._extra):
            return
        self._lock.acquire()  # held until the COMMIT is done (released in _committed)
        error = self._begin(loop)
        if error == "busy":  # another writer has the lock: the batch waits for a later turn
            self._lock.release()
            return
        batch, self._pending = self._pending[:BATCH_LIMIT], self._pending[BATCH_LIMIT:]
        extra, self._extra = self._extra, []
        items = [item for item, _ in batch]
        if error is not None:
            self._lock.release()
            self._settle(batch, self._failed(items, error), loop)
            return
        prepared = self._prepare(items, extra)
        if isinstance(prepared, list):
            self._lock.release()
            self._settle(batch, prepared, loop)
            return
        assert self._committer is not None
        self._committing = True
        if len(items) <= INLINE_COMMIT:
            self._committed(batch, items, prepared, self._commit_inline(loop), loop)
            return
        done = loop.run_in_executor(self._committer, self._commit)
        done.add_done_callback(
            lambda result: self._committed(batch, items, prepared, result, loop)
        )

    def _commit_inline(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """COMMIT on the loop's own thread; a done future, as from the committer."""
        done: asyncio.Future[None] = loop.create_future()
        try:
            self._commit()
        except Exception as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)
        return done

    def _begin(self, loop: asyncio.AbstractEventLoop) -> BaseException | Literal["busy"] | None:
        """BEGIN IMMEDIATE without ever sleeping on the loop. None: begun. "busy": another
        writer holds the lock, `_flush` is scheduled again (at once for the first
        millisecond, then every millisecond). An error: give up on this batch (503)."""
        conn = self._conn
        if conn is None:
            return StoreUnavailable("the store is closed")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                return exc
            now = time.monotonic()
            since = self._busy_since = self._busy_since or now
            if now - since >= WRITE_BUSY:
                self._busy_since = None
                return exc
            self._flush_scheduled = True
            if now - since < 0.001:
                loop.call_soon(self._flush, loop)
            else:
                loop.call_later(0.001, self._flush, loop)
            return "busy"
        except sqlite3.Error as exc:
            return exc
        self._busy_since = None
        return None

    def _committed(
        self,
        batch: list[tuple[_Ingest, asyncio.Future[Accepted]]],
        items: list[_Ingest],
        prepared: _Prepared,
        result: asyncio.Future[None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._committing = False
        self._lock.release()
        # the next batch first: its statements run, and its COMMIT goes to the thread,
        # before the answers to this one are written (they overlap with that COMMIT)
        if self._pending or self._extra:
            self._schedule(loop)
        error = result.exception()
        outcomes = self._failed(items, error) if error else self._done(prepared)
        self._settle(batch, outcomes, loop)

    def _settle(
        self,
        batch: list[tuple[_Ingest, asyncio.Future[Accepted]]],
        outcomes: list[Accepted | BaseException],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue  # the client went away
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if self._pending or self._extra:
            self._schedule(loop)

    def ingest(self, decoded: Decoded, body: bytes, received_at: datetime) -> Accepted:
        """Store one webhook now, blocking: for callers without an event loop (tests,
        tools). Not to be mixed with `submit_async` on the same store."""
        outcome = self._write([_Ingest(decoded, body, received_at)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _transaction(self, fn: Callable[[sqlite3.Connection], int]) -> int:
        """Run `fn` in a write transaction; it returns how many outbox rows it added."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreUnavailable("the store is closed")
            try:
                _begin_blocking(conn)
                added = fn(conn)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise StoreUnavailable(f"the store cannot write: {exc}") from exc
        if added:
            self._notify()
        return added

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    # -- maintenance -------------------------------------------------------------------------

    def _maintain(self) -> None:
        """Checkpoint the WAL every 0.1 s and forget old notify ids now and then, on a
        connection of its own (a passive checkpoint never blocks a writer). Often, so
        that each checkpoint's fsync of the database is small: one after a second of
        heavy load flushed megabytes, and the commits behind it waited 100 ms+."""
        conn = connect(self.path, self.synchronous, SMALL_CACHE_KIB)
        # RESTART waits this long for readers (and blocks new writers meanwhile), no more
        conn.execute(f"PRAGMA busy_timeout={int(RESTART_BUSY * 1000)}")
        next_cleanup = 0.0
        try:
            while not self._stopping.wait(CHECKPOINT_EVERY):
                try:
                    self._checkpoint(conn)
                    if time.monotonic() >= next_cleanup:
                        cutoff = time.time() - self.dedup_seconds
                        with conn:
                            conn.execute("DELETE FROM seen WHERE at < ?", (cutoff,))
                        next_cleanup = time.monotonic() + CLEANUP_EVERY
                except sqlite3.OperationalError as exc:
                    # busy: a long write has the store (startup's discovery sync of a large
                    # fleet, say), and the next turn tries again
                    if not is_busy(exc):
                        log.warning("store maintenance could not run: %s", exc)
                except sqlite3.Error as exc:
                    log.warning("store maintenance could not run: %s", exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()

    @staticmethod
    def _checkpoint(conn: sqlite3.Connection) -> None:
        """Copy the WAL into the database, and now and then start the WAL over.

        SQLite starts the WAL over only when a writer begins while no reader is in it;
        with the webhook side and the publisher both busy that moment rarely comes, and
        the WAL grew by 18 MB a second at 500 webhooks/s. A WAL that only grows makes
        every fsync also write the file's new size (the file system's journal): commits
        of 100 ms now and then. So once it is past RESTART_FRAMES, and the passive
        checkpoint has copied all of it, a RESTART makes the next writer begin at the
        start of the file again; only a few frames are left to copy by then, so the
        writers it blocks wait a millisecond or two."""
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if busy == 0 and frames >= RESTART_FRAMES and copied == frames:
            try:
                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise  # busy: a reader stayed longer than RESTART_BUSY; next time

    # -- one batch ---------------------------------------------------------------------------

    def _write(self, ingests: list[_Ingest]) -> list[Accepted | BaseException]:
        """One transaction for the whole batch, committed here: an outcome per webhook."""
        with self._lock:
            if self._conn is None:
                return [StoreUnavailable("the store is closed") for _ in ingests]
            try:
                _begin_blocking(self._conn)
            except sqlite3.Error as exc:
                return self._failed(ingests, exc)
            prepared = self._prepare(ingests, [])
            if isinstance(prepared, list):
                return prepared
            try:
                self._commit()
            except sqlite3.Error as exc:
                return self._failed(ingests, exc)
        return self._done(prepared)

    def _prepare(
        self, ingests: list[_Ingest], extra: list[Message]
    ) -> _Prepared | list[Accepted | BaseException]:
        """Every statement of the batch in the transaction its caller began, short of the
        COMMIT; on a failure the transaction is rolled back and the outcomes (all
        failures) are returned instead."""
        conn = self._conn
        if conn is None:
            return [StoreUnavailable("the store is closed") for _ in ingests]
        results: list[Accepted | BaseException] = []
        new_esims = 0
        try:
            waiting = backlog(conn)
            records: dict[str, Record | None] = {}
            outbox: list[Message] = []
            for item in ingests:
                try:
                    result, new = self._ingest_one(
                        conn, item, records, waiting + len(outbox), outbox
                    )
                except sqlite3.Error:
                    raise  # the whole transaction is in doubt: fail the batch
                except Exception as exc:  # a bug for this body only: keep the others
                    log.exception("could not store a %s webhook", item.decoded.notify_type)
                    results.append(exc)
                    continue
                results.append(result)
                new_esims += new
            _insert_outbox(conn, outbox + extra)
        except sqlite3.Error as exc:
            return self._failed(ingests, exc)
        return _Prepared(results, len(outbox) + len(extra), new_esims)

    def _commit(self) -> None:
        """COMMIT, the fsync included; runs on the committer thread for the event loop."""
        assert self._conn is not None
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error:
            _rollback(self._conn)
            raise

    def _failed(
        self, ingests: list[_Ingest], exc: BaseException
    ) -> list[Accepted | BaseException]:
        if self._conn is not None:
            _rollback(self._conn)
        self.last_error = f"the store cannot write: {exc}"
        log.error("%s (%d webhooks answered 503)", self.last_error, len(ingests))
        return [StoreUnavailable(self.last_error) for _ in ingests]

    def _done(self, prepared: _Prepared) -> list[Accepted | BaseException]:
        self.last_error = None
        self.esims += prepared.new_esims
        if prepared.added:
            self._notify()
        return prepared.results

    def _load(self, conn: sqlite3.Connection, key: str) -> Record | None:
        row = conn.execute("SELECT record FROM entity WHERE key = ?", (key,)).fetchone()
        return None if row is None else _record_decoder.decode(row[0])

    def _ingest_one(
        self,
        conn: sqlite3.Connection,
        item: _Ingest,
        records: dict[str, Record | None],
        pending: int,
        outbox: list[Message],
    ) -> tuple[Accepted | BaseException, int]:
        """Store one webhook inside the open transaction: (result, new eSIMs).

        Everything that can fail for this body alone (the plan, encoding) happens before
        its first write, so a failure leaves nothing of it behind and the batch goes on.
        Its messages are appended to `outbox`, written once for the whole batch.
        """
        decoded = item.decoded
        key = dedup_key(decoded, item.body)
        now = item.received_at.timestamp()
        row = conn.execute("SELECT at FROM seen WHERE key = ?", (key,)).fetchone()
        if row is not None and row[0] >= now - self.dedup_seconds:
            return Accepted(duplicate=True), 0
        if pending >= self.max_outbox:
            return OutboxFull(
                f"the outbox is full ({pending} messages wait for the broker): "
                "check the broker, or raise store.max_outbox"
            ), 0

        entity = topics.entity_key(decoded)
        prior: Record | None = None
        if entity is not None:
            prior = records[entity] if entity in records else self._load(conn, entity)
        result = topics.plan(decoded, item.body, prior, item.received_at, self.base)
        blob = b""
        discovery: list[Message] = []
        if result.entity is not None and result.record is not None:
            blob = _record_encoder.encode(result.record)
            if self.discovery is not None and (
                prior is None
                or self.discovery.inputs(result.entity, prior)
                != self.discovery.inputs(result.entity, result.record)
            ):
                discovery = self._changed_discovery(conn, result.entity, result.record)

        # writes from here on
        conn.execute("INSERT OR REPLACE INTO seen (key, at) VALUES (?, ?)", (key, now))
        new_esim = 0
        if result.entity is not None and result.record is not None:
            records[result.entity] = result.record
            conn.execute(
                "INSERT OR REPLACE INTO entity (key, record) VALUES (?, ?)", (result.entity, blob)
            )
            if discovery:  # only when a config changed: rarely after an eSIM's first event
                conn.executemany(
                    "INSERT OR REPLACE INTO discovery (topic, payload) VALUES (?, ?)",
                    [(m.topic, m.payload) for m in discovery],
                )
            new_esim = int(prior is None and result.entity.startswith("esim:"))
        outbox.extend(discovery)
        outbox.extend(result.messages)
        count = len(discovery) + len(result.messages)
        return Accepted(False, result.iccid, result.warning, count, result.notice), new_esim

    def _changed_discovery(
        self, conn: sqlite3.Connection, entity: str, record: Record
    ) -> list[Message]:
        """The discovery messages whose payload differs from what was sent last."""
        assert self.discovery is not None
        changed = []
        for message in self.discovery.messages(entity, record):
            row = conn.execute(
                "SELECT payload FROM discovery WHERE topic = ?", (message.topic,)
            ).fetchone()
            if row is None or bytes(row[0]) != message.payload:
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
                    for message in self.discovery.messages(key, _record_decoder.decode(blob)):
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
            _insert_outbox(conn, out)
            return len(out)

        return self._transaction(work)
