"""Which replica publishes, when several bridges share one PostgreSQL database.

Every replica takes webhooks, but only one may publish (and call the provider): two
publishers would send the same outbox twice and out of order. The one that publishes is
the one whose publisher process holds a PostgreSQL advisory lock (`PUBLISHER_LOCK`) on a
connection of its own. PostgreSQL frees the lock when that session ends: at once when
the process dies (even `kill -9`: the socket closes), when the server restarts, and,
when the network between them stalls, once the server has heard nothing from the
session for `IDLE_LIMIT` seconds (`idle_session_timeout`, set on this connection; the
holder sends a query every `BEAT` seconds, so that only happens to a holder cut off).

A holder cannot see the moment its lock is freed, so the lock is held as a lease:

- the holder publishes only until `LEASE` seconds after it *sent* its last query that
  succeeded (the server had not ended its session before that query arrived);
- a replica that gets the lock starts publishing only `LEASE` seconds after the answer
  *arrived* (the previous holder's session had ended before that).

So the previous holder has stopped before the next one starts, whatever freed the lock:
a crash, a stall, a paused machine, a restarted server. The publisher checks `holds()`
before each write to the broker (see `Publisher._wait`) and leaves at once when it says
no. A takeover takes `POLL + LEASE` seconds after the lock is freed: about 5 s after a
`kill -9`, about 11 s after a stall (`IDLE_LIMIT` more).

On SQLite there is one bridge, and no lease: it always publishes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from bridge import db

log = logging.getLogger("bridge.publisher")

BEAT = 1.0  # s between the holder's queries (and a standby's tries for the lock)
LEASE = 4.0  # s a holder may publish after sending a query that succeeded
IDLE_LIMIT = 6.0  # s of silence after which PostgreSQL ends the holder's session
CONNECT_TIMEOUT = 3  # s


class Lease:
    """The publisher's lock, tried for and kept on a thread of its own (`start()`), so
    that a long read of the outbox or a busy broker never delays a beat."""

    def __init__(self, url: str) -> None:
        from bridge.postgres import PUBLISHER_LOCK  # psycopg only with store.url

        self._url = url
        self._key = PUBLISHER_LOCK
        self._conn: Any = None
        self._errors = db.postgres_errors()
        self._stop = threading.Event()
        self._held = False
        self._until = 0.0  # monotonic: publishing must stop by then
        self._from = float("inf")  # monotonic: publishing may start then
        self.error: str | None = None  # why the lock cannot be tried now
        self._warned = 0.0

    def start(self) -> None:
        threading.Thread(target=self._run, name="publisher-lease", daemon=True).start()

    def stop(self) -> None:
        """Let the lock go (the session ends with the connection)."""
        self._stop.set()

    def holds(self) -> bool:
        """True while this replica may publish."""
        now = time.monotonic()
        return self._held and self._from <= now < self._until

    def safe(self) -> bool:
        """True while no other replica can have started publishing: even after the lock
        was lost (a server restart), until the lease would have run out."""
        now = time.monotonic()
        return self._from <= now < self._until

    def _run(self) -> None:
        while not self._stop.is_set():
            self._beat()
            self._stop.wait(BEAT)
        self._held = False
        self._disconnect()

    def _beat(self) -> None:
        """One query: renew the lease if the lock is ours, else try to take it."""
        try:
            if self._conn is None:
                self._conn = self._connect()
            sent = time.monotonic()
            if self._held:
                self._conn.execute("SELECT 1")
                self._until = sent + LEASE
                return
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
            if row is not None and row[0]:
                arrived = time.monotonic()
                self._from, self._until = arrived + LEASE, sent + LEASE
                self._held = True
                log.info("this replica holds the publisher's lock: it publishes in %.0f s, "
                         "once any replica that held it before has stopped", LEASE)
            self.error = None
        except self._errors as exc:
            self._lost(exc)

    def _connect(self) -> Any:
        conn = db.connect_postgres(self._url, "esim-bridge-lease")
        try:
            conn.execute(f"SET idle_session_timeout = {int(IDLE_LIMIT * 1000)}")
            conn.execute(f"SET idle_in_transaction_session_timeout = {int(IDLE_LIMIT * 1000)}")
        except self._errors:
            conn.close()
            raise
        return conn

    def _lost(self, exc: Exception) -> None:
        """The connection failed: the lock is gone with its session (if it was ours)."""
        if self._held:
            log.warning("lost the publisher's lock with the store's connection: %s", exc)
        elif time.monotonic() - self._warned > 60:
            self._warned = time.monotonic()
            log.warning("cannot try for the publisher's lock: %s; trying again", exc)
        self._held = False
        self.error = f"cannot reach the store: {exc}".strip()
        self._disconnect()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*self._errors):
                conn.close()
