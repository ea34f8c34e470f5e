"""The store on SQLite: one file in WAL mode, one writer connection (the default).

The connections themselves are opened as `bridge/db.py` says (the publisher process and
the maintenance thread open theirs the same way). Only one connection writes at a time
(BEGIN IMMEDIATE), so a batch needs no locks of its own.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bridge import db
from bridge.backend import Statements, StoreUnavailable
from bridge.homeassistant import BRIDGE_OBJECT_ID
from bridge.outbox import backlog

SCHEMA_VERSION = 1
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
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    payload BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS retained_owner ON retained (owner);
"""
log = logging.getLogger("bridge.store")

BLOCKING_BUSY = 5.0  # s: the longest wait for another writer while opening


class Sqlite:
    """The SQLite backend: a writer connection, and a reader for the backlog."""

    sql = Statements()
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    locks = False
    remote = False

    def __init__(self, path: Path, synchronous: str = "full") -> None:
        self.path = path
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None

    def describe(self) -> str:
        return str(self.path)

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = db.connect(self.path, self.synchronous)
        _begin_blocking(conn)
        try:
            _upgrade(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        # The event loop writes on this connection, so SQLite's busy handler must never
        # sleep on it (1 ms at the least, while no request is served): the committer
        # tries again on a later turn of the loop instead.
        conn.execute("PRAGMA busy_timeout=0")
        self._conn = conn
        self._reader = db.connect(self.path, self.synchronous, db.SMALL_CACHE_KIB)

    def close(self) -> None:
        for conn in (self._conn, self._reader):
            if conn is not None:
                conn.close()
        self._conn = self._reader = None

    def begin(self) -> sqlite3.Connection:
        """BEGIN IMMEDIATE, without waiting: sqlite3.OperationalError (see `is_busy`)
        when another connection is writing."""
        conn = self._writer()
        conn.execute("BEGIN IMMEDIATE")
        return conn

    def commit(self) -> None:
        self._writer().execute("COMMIT")

    def rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed")

    def is_busy(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and db.is_busy(exc)

    def lock(self, conn: Any, keys: Sequence[str], everything: bool) -> None:
        """Nothing to do: BEGIN IMMEDIATE made this connection the only writer."""

    def before_outbox(self, conn: Any) -> None:
        """Nothing to do: one writer at a time, so ids are taken in commit order."""

    def executemany(self, conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
        conn.executemany(sql, rows)

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        conn = db.connect(self.path, self.synchronous, db.SMALL_CACHE_KIB)
        try:
            yield conn
        finally:
            conn.close()

    def backlog(self) -> int:
        if self._reader is None:
            return 0
        try:
            return backlog(self._reader)
        except sqlite3.Error:
            return 0

    def esims(self) -> int | None:
        return None  # one bridge per file: the store counts its own

    def _writer(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("the store is closed")
        return self._conn


def _begin_blocking(conn: sqlite3.Connection, timeout: float = BLOCKING_BUSY) -> None:
    """BEGIN IMMEDIATE, waiting up to `timeout` for another writer (opening the store)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not db.is_busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.001)


def _upgrade(conn: sqlite3.Connection) -> None:
    """Create the tables, or bring an older store's up to SCHEMA_VERSION."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"the store {version=} was written by a newer esim-bridge (this one knows "
            f"{SCHEMA_VERSION}): upgrade esim-bridge, or point store.path elsewhere"
        )
    old = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'discovery'"
    ).fetchone()
    for statement in SCHEMA.split(";"):  # executescript would COMMIT the transaction
        if statement.strip():
            conn.execute(statement)
    if old is not None:
        # Version 0 kept the discovery configs it sent in a table of their own: they move
        # to the device's entity (`<prefix>/device/esim_<iccid>/config` to `esim:<iccid>`),
        # and the first resync fills in the rest.
        for topic, payload in conn.execute("SELECT topic, payload FROM discovery").fetchall():
            object_id = topic.split("/")[-2]
            owner = "bridge" if object_id == BRIDGE_OBJECT_ID else f"esim:{object_id[5:]}"
            conn.execute("INSERT OR IGNORE INTO retained (owner, topic, payload) VALUES "
                         "(?, ?, ?)", (owner, topic, payload))
        conn.execute("DROP TABLE discovery")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
