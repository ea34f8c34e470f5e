"""A real store, driven from a test the way the bridge drives it: every write goes
through the committer (group commit, the one transaction body), on an event loop."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from bridge import __version__
from bridge.committer import Committer
from bridge.homeassistant import HomeAssistant
from bridge.models import decode
from bridge.outbox import Message
from bridge.store import Accepted, Store
from bridge.topics import Topics


class Driver:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.committer = Committer(store)
        self.db = sqlite3.connect(store.path, isolation_level=None)

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

    def outbox(self, after: int = 0) -> list[tuple[int, Message]]:
        rows = self.db.execute(
            "SELECT id, topic, payload, retain FROM outbox WHERE id > ? ORDER BY id", (after,)
        )
        return [(i, Message(t, bytes(p), bool(r))) for i, t, p, r in rows]

    def retained(self) -> dict[str, bytes]:
        rows = self.db.execute("SELECT topic, payload FROM retained")
        return {topic: bytes(payload) for topic, payload in rows}


@contextmanager
def open_store(
    path: Path, *, base: str = "esim", discovery: bool = True, prefix: str = "homeassistant",
    synchronous: str = "full", forget_ended_days: float = 30,
) -> Iterator[Driver]:
    topics = Topics(base)
    ha = HomeAssistant(topics, prefix=prefix, version=__version__,
                       forget_ended_days=forget_ended_days) if discovery else None
    store = Store(path, topics=topics, synchronous=synchronous, homeassistant=ha)
    store.open()
    driver = Driver(store)
    try:
        driver.resync()
        yield driver
    finally:
        driver.db.close()
        driver.committer.close()
        store.close()
