"""What the store needs of a database engine: SQLite (`bridge/db.py`) or PostgreSQL
(`bridge/postgres.py`).

The store's promises (dedup, the merge, ICCID reuse, the outbox and the retained table)
live once, in `bridge/store.py`; an engine only opens connections, begins, commits and
rolls back, creates or upgrades the schema, spells a few statements its own way, and
says which of its errors mean "busy, try again". Both drivers follow DB-API closely
enough (`conn.execute(sql, params)` returns rows to fetch or iterate) for the store to
run the same code on either connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol


class StoreUnavailable(Exception):
    """The store cannot write right now (disk full, locked, closed, the database out of
    reach): answer 503."""


class Connection(Protocol):
    """A connection as the store uses it: sqlite3's, or psycopg's."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...


@dataclass(frozen=True, slots=True)
class Statements:
    """The store's statements, as SQLite spells them (`?` placeholders). PostgreSQL's are
    the same but for the placeholders and the upserts (`Statements.postgres`)."""

    seen_at: str = "SELECT at FROM seen WHERE key = ?"
    put_seen: str = "INSERT OR REPLACE INTO seen (key, at) VALUES (?, ?)"
    record: str = "SELECT record FROM entity WHERE key = ?"
    put_record: str = "INSERT OR REPLACE INTO entity (key, record) VALUES (?, ?)"
    records: str = "SELECT key, record FROM entity"
    esim_records: str = "SELECT key, record FROM entity WHERE key LIKE 'esim:%'"
    count_esims: str = "SELECT count(*) FROM entity WHERE key LIKE 'esim:%'"
    # the orders that hold no `<base>/order/<orderNo>/esims` yet: rarely more than a few,
    # so that looking for the pending ones often reads next to nothing (GLOB, unlike LIKE,
    # walks the primary key's index on SQLite)
    unresolved_orders: str = (
        "SELECT key, record FROM entity WHERE key GLOB 'order:*' AND NOT EXISTS "
        "(SELECT 1 FROM retained WHERE owner = entity.key AND topic LIKE '%/esims')"
    )
    owners: str = "SELECT DISTINCT owner FROM retained"
    held: str = "SELECT topic, payload FROM retained WHERE owner = ?"
    payload: str = "SELECT payload FROM retained WHERE owner = ? AND topic = ?"
    put_outbox: str = "INSERT INTO outbox (topic, payload, retain) VALUES (?, ?, ?)"
    put_retained: str = (
        "INSERT INTO retained (owner, topic, payload) VALUES (?, ?, ?) "
        "ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload"
    )
    clear_retained: str = "DELETE FROM retained WHERE owner = ? AND topic = ?"
    # A batch's records and dedup keys read ahead, each in one statement over an array
    # (`Store._start`): on a remote backend only (`Backend.remote`), where each statement
    # waits for a round trip; SQLite has no arrays, and needs no reading ahead.
    records_of: str = "SELECT key, record FROM entity WHERE key = ANY(?::text[])"
    seen_of: str = "SELECT key, at FROM seen WHERE key = ANY(?::text[])"

    @classmethod
    def postgres(cls) -> Statements:
        """`%s` placeholders (the statements hold no literal `%` that takes parameters),
        `ON CONFLICT ... DO UPDATE` for SQLite's `INSERT OR REPLACE`, and LIKE for GLOB."""
        sqlite = cls()
        spelled = {f.name: getattr(sqlite, f.name).replace("?", "%s") for f in fields(cls)}
        spelled.update(
            put_seen="INSERT INTO seen (key, at) VALUES (%s, %s) "
                     "ON CONFLICT (key) DO UPDATE SET at = excluded.at",
            put_record="INSERT INTO entity (key, record) VALUES (%s, %s) "
                       "ON CONFLICT (key) DO UPDATE SET record = excluded.record",
            unresolved_orders=sqlite.unresolved_orders.replace("GLOB 'order:*'",
                                                               "LIKE 'order:%'"),
        )
        return replace(sqlite, **spelled)


class Backend(Protocol):
    """One engine under the store. The store calls these from one caller at a time (the
    committer), except `reading` and `backlog`, which may come from any thread."""

    sql: Statements
    errors: tuple[type[Exception], ...]  # the driver's errors: the batch fails, a 503
    locks: bool  # True: `lock` must be told every key a batch touches (several writers)
    # True: a statement whose result is read waits for a round trip to a server, which
    # may stall or wait for another bridge's lock: the committer then runs a whole batch
    # off the event loop, and the store reads a batch's records ahead (`Store._start`)
    remote: bool

    def describe(self) -> str:
        """Where the store is, safe to print (a password masked)."""

    def open(self) -> None:
        """Connect, and create or upgrade the schema (StoreUnavailable if it cannot)."""

    def close(self) -> None: ...

    def begin(self) -> Connection:
        """Begin the write transaction, without waiting for another writer: an error
        that `is_busy` recognises when another writer holds the store."""

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """Roll back the write transaction, if one is open; never raises."""

    def is_busy(self, exc: Exception) -> bool: ...

    def lock(self, conn: Connection, keys: Sequence[str], everything: bool) -> None:
        """Hold the entities (and dedup keys) a batch reads and writes until it ends, so
        that another writer's batch on the same ones waits for it: `everything` for a
        batch that reads them all (a resync)."""

    def before_outbox(self, conn: Connection) -> None:
        """Called just before a batch appends to the outbox."""

    def executemany(self, conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> None: ...

    def reading(self) -> AbstractContextManager[Connection]:
        """A connection for reads off the write path (blocking: run it on a thread)."""

    def backlog(self) -> int:
        """Messages in the outbox not yet acknowledged; 0 when it cannot tell."""

    def esims(self) -> int | None:
        """eSIMs in the store as counted by the engine, when other processes add them too
        (replicas); None when this process's own count is the whole story."""

