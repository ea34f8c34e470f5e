"""The store on PostgreSQL (`store.url`): several bridges may share one database.

psycopg 3, synchronous, with psycopg_pool: the store's one transaction body runs as it
does on SQLite, on the committer's thread (`bridge/committer.py`), on a writer
connection the store keeps between batches; the pool reconnects in the background when
the database comes back, and lends connections to reads off the write path.

Round trips: a batch runs in psycopg's pipeline mode, from BEGIN to COMMIT. A statement
is sent at once and its result read only when the store asks for it (a `fetch`), so only
reads wait for the server; the writes travel with the next read, or with the COMMIT. The
store reads what a batch needs ahead, in one statement per table (`Store._start`), so a
batch of webhooks of known eSIMs takes two round trips whatever its size: BEGIN, the
locks and the reads; then the writes and the COMMIT. (It took 4N + 8 for N webhooks,
one per statement.) BEGIN and COMMIT are the backend's own statements, on a writer
connection in autocommit: psycopg would send its own BEGIN alone and wait for it.

Several writers: each batch takes, before its first read, a transaction-scoped advisory
lock per entity and per dedup key it touches, in one order (by lock id), so two bridges
that take events of one eSIM, or the same notifyId, at the same moment run one after the
other: the second sees the first's record and `seen` row, and the out-of-order rule,
ICCID reuse and dedup hold whichever got which. A resync, which reads every entity,
takes the lock under all of them exclusively (the others take it shared). Appending to
the outbox takes one more lock, held to the COMMIT, so that outbox ids become visible in
the order they were given (a reader that has passed id n never finds a smaller one
committed later).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from bridge.backend import Statements, StoreUnavailable
from bridge.config import mask_url
from bridge.outbox import backlog

log = logging.getLogger("bridge.store")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS store_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS seen_at ON seen (at);
CREATE TABLE IF NOT EXISTS entity (key TEXT PRIMARY KEY, record BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BYTEA NOT NULL,
    retain SMALLINT NOT NULL
);
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    payload BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS retained_owner ON retained (owner);
"""
OPEN_WAIT = 10.0  # s: the longest wait for the database at start
WRITER_WAIT = 0.25  # s: for a connection to write on (the pool reconnecting); then 503
READ_WAIT = 0.1  # s: for a connection to count the backlog on; else the last count stands
COUNT_EVERY = 1.0  # s: the backlog is counted at most this often
# Per connection: a batch waits at most this long for another bridge's lock (a bridge
# stalled mid-transaction): then 503, not a loop stopped for good; a transaction left
# idle that long (its bridge cut off) is ended by the server, which frees its locks.
OPTIONS = "-c lock_timeout=2000 -c idle_in_transaction_session_timeout=15000"
CONNECT = {
    "connect_timeout": 3,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "application_name": "esim-bridge",
    "options": OPTIONS,
}


def lock_id(name: str) -> int:
    """A 64-bit advisory lock id for a name (an entity's key, a dedup key)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8, person=b"esim-bridge").digest()
    return int.from_bytes(digest, "big", signed=True)


SCHEMA_LOCK = lock_id("lock:schema")
ALL_LOCK = lock_id("lock:all")
OUTBOX_LOCK = lock_id("lock:outbox")
PUBLISHER_LOCK = lock_id("lock:publisher")  # held by the publishing replica (bridge/lease.py)


class Postgres:
    """The PostgreSQL backend: a pool, and the writer connection taken from it."""

    sql = Statements.postgres()
    errors: tuple[type[Exception], ...] = (psycopg.Error,)
    locks = True
    remote = True

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        self.url = url
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, kwargs=dict(CONNECT),
            name="esim-bridge",
        )
        self._conn: psycopg.Connection[Any] | None = None
        self._pipeline: ExitStack | None = None  # from `begin` to `commit` or `rollback`
        self._open = False
        self._backlog = 0
        self._esims: int | None = None  # until first counted
        self._counted_at = -COUNT_EVERY
        self._counting = False

    def describe(self) -> str:
        return mask_url(self.url)

    def open(self) -> None:
        try:
            self._pool.open(wait=True, timeout=OPEN_WAIT)
        except psycopg.Error as exc:
            self._pool.close()
            raise StoreUnavailable(
                f"cannot reach PostgreSQL at {self.describe()} within {OPEN_WAIT:.0f} s "
                f"({exc}): is it running, and is store.url right?"
            ) from exc
        try:
            with self._pool.connection(timeout=OPEN_WAIT) as conn:
                _upgrade(conn)
        except BaseException:
            self._pool.close()
            raise
        self._open = True

    def close(self) -> None:
        self._give_back()
        self._open = False
        self._pool.close()

    def begin(self) -> psycopg.Connection[Any]:
        """The writer connection, in a pipeline, with BEGIN sent (its answer is read with
        the batch's first read)."""
        if not self._open:
            raise StoreUnavailable("the store is closed")
        if self._conn is None or self._conn.broken:
            self._give_back()
            self._conn = self._pool.getconn(timeout=WRITER_WAIT)
            self._conn.autocommit = True  # BEGIN and COMMIT are sent here, in the pipeline
        conn = self._conn
        self._pipeline = ExitStack()
        try:
            self._pipeline.enter_context(conn.pipeline())
            conn.execute("BEGIN")
        except psycopg.Error:
            self.rollback()
            raise
        return conn

    def commit(self) -> None:
        """COMMIT, sent after the batch's writes; the pipeline's end waits for all their
        answers (one round trip) and raises the first error among them."""
        if self._conn is None:
            raise StoreUnavailable("the store is closed")
        self._conn.execute("COMMIT")
        self._end_pipeline()

    def rollback(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            # the batch's error is raised already; the server skipped what came after it
            with suppress(psycopg.Error):
                self._end_pipeline()
            conn.rollback()
        except psycopg.Error:
            log.info("rollback failed: the connection is given up", exc_info=True)
            self._give_back()
            return
        if conn.broken:
            self._give_back()

    def _end_pipeline(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.close()

    def is_busy(self, exc: Exception) -> bool:
        """Never: a batch waits for another bridge's lock inside a statement instead."""
        return False

    def lock(self, conn: Any, keys: Sequence[str], everything: bool) -> None:
        shared = "" if everything else "_shared"
        conn.execute(f"SELECT pg_advisory_xact_lock{shared}(%s)", (ALL_LOCK,))
        ids = sorted({lock_id(key) for key in keys})
        if ids:  # in the array's order: every bridge takes them in the same one
            conn.execute("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) k",
                         (ids,))

    def before_outbox(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (OUTBOX_LOCK,))

    def executemany(self, conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            with conn.cursor() as cursor:
                cursor.executemany(sql, rows)

    @contextmanager
    def reading(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection(timeout=OPEN_WAIT) as conn:
            yield conn

    def backlog(self) -> int:
        """As last counted, and counted again on a thread of its own when that is more
        than COUNT_EVERY ago: asked on the event loop (/readyz, /metrics, bridge/info), a
        round trip would hold every webhook up while the network to the database stalls."""
        now = time.monotonic()
        if self._open and not self._counting and now - self._counted_at >= COUNT_EVERY:
            self._counting, self._counted_at = True, now
            threading.Thread(target=self._count, name="store-backlog", daemon=True).start()
        return self._backlog

    def esims(self) -> int | None:
        """Counted with the backlog: other replicas add eSIMs too."""
        self.backlog()
        return self._esims

    def _count(self) -> None:
        try:
            with self._pool.connection(timeout=READ_WAIT) as conn:
                self._backlog = backlog(conn)
                row = conn.execute(self.sql.count_esims).fetchone()
                self._esims = int(row[0]) if row is not None else 0
        except psycopg.Error:
            pass  # the last count stands; the writes say what is wrong
        finally:
            self._counting = False

    def _give_back(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            self._end_pipeline()
            conn.autocommit = False  # as the pool lends its connections to readers
        except psycopg.Error:
            pass  # a broken connection, or one left in a transaction: the pool closes it
        try:
            self._pool.putconn(conn)  # a broken one is closed, and replaced in time
        except Exception:
            log.info("could not give a connection back to the pool", exc_info=True)


def _upgrade(conn: psycopg.Connection[Any]) -> None:
    """Create the tables, or check they are of a version this bridge knows. Under an
    advisory lock: bridges starting together take turns (CREATE TABLE IF NOT EXISTS at
    the same moment in two transactions can fail on the catalog's unique index)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    row = conn.execute("SELECT max(version) FROM store_version").fetchone()
    version = None if row is None else row[0]
    if version is None:
        conn.execute("INSERT INTO store_version (version) VALUES (%s)", (SCHEMA_VERSION,))
    elif version > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"the store {version=} was written by a newer esim-bridge (this one knows "
            f"{SCHEMA_VERSION}): upgrade esim-bridge, or point store.url elsewhere"
        )
