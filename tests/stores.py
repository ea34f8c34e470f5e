"""A real store, driven from a test the way the bridge drives it: every write goes
through the committer (group commit, the one transaction body), on an event loop.

On either backend: a place is a `Path` (SQLite) or a `postgresql://` URL (a database of
the test's own on the PostgreSQL at 127.0.0.1:5432, made by `postgres_database`)."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge import __version__
from bridge.committer import Committer
from bridge.homeassistant import HomeAssistant
from bridge.models import decode
from bridge.outbox import Message
from bridge.store import Accepted, Poll, Store
from bridge.topics import Reading, Topics

POSTGRES = "postgresql://postgres@127.0.0.1:5432"
Place = Path | str


class Driver:
    def __init__(self, store: Store, place: Place) -> None:
        self.store = store
        self.committer = Committer(store)
        self.db: Any
        if isinstance(place, Path):
            self.db = sqlite3.connect(place, isolation_level=None)
            self.placeholder = "?"
        else:
            import psycopg

            self.db = psycopg.connect(place, autocommit=True)
            self.placeholder = "%s"

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A statement written with `?`, on a connection of the test's own."""
        rows = self.db.execute(sql.replace("?", self.placeholder), params)
        return list(rows) if rows.description else []

    def ingest(self, raw: bytes, received_at: datetime | None = None) -> Accepted:
        """Store one webhook body, as the HTTP route does; its outcome once committed."""
        when = received_at or datetime.now(UTC)
        return asyncio.run(self.committer.submit_async(decode(raw), raw, when))

    def resync(self) -> int:
        return asyncio.run(self.committer.resync())

    def forget(self) -> int:
        return asyncio.run(self.committer.forget())

    def post(self, messages: list[Message]) -> int:
        return asyncio.run(self.committer.post(messages))

    def poll(self, readings: list[Reading], order_no: str | None = None) -> int:
        """Store what the provider's API said, as `bridge/sync.py` does (read now)."""

        async def submit() -> int:
            sent = await self.committer.submit(Poll(readings, datetime.now(UTC), order_no))
            assert isinstance(sent, int), sent
            return sent

        return asyncio.run(submit())

    def outbox(self, after: int = 0) -> list[tuple[int, Message]]:
        rows = self.execute(
            "SELECT id, topic, payload, retain FROM outbox WHERE id > ? ORDER BY id", (after,)
        )
        return [(i, Message(t, bytes(p), bool(r))) for i, t, p, r in rows]

    def retained(self) -> dict[str, bytes]:
        rows = self.execute("SELECT topic, payload FROM retained")
        return {topic: bytes(payload) for topic, payload in rows}


def make_store(
    place: Place, *, base: str = "esim", discovery: bool = True,
    prefix: str = "homeassistant", synchronous: str = "full", forget_ended_days: float = 30,
) -> Store:
    topics = Topics(base)
    ha = HomeAssistant(topics, prefix=prefix, version=__version__,
                       forget_ended_days=forget_ended_days) if discovery else None
    if isinstance(place, Path):
        return Store(place, topics=topics, synchronous=synchronous, homeassistant=ha)
    return Store(Path("unused"), topics=topics, homeassistant=ha, url=place)


@contextmanager
def open_store(place: Place, **settings: Any) -> Iterator[Driver]:
    store = make_store(place, **settings)
    store.open()
    driver = Driver(store, place)
    try:
        driver.resync()
        yield driver
    finally:
        driver.db.close()
        driver.committer.close()
        store.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new database on the local PostgreSQL, dropped afterwards: its URL."""
    import psycopg

    name = f"esim_test_{secrets.token_hex(6)}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
