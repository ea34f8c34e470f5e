"""Store upkeep on a thread of its own: checkpoints, and forgetting old notify ids.

Copying the WAL into the database runs here, on a connection of its own (a passive
checkpoint never blocks a writer), so a commit never pays for a checkpoint. On PostgreSQL
(`store.url`) there is nothing to checkpoint: only the old notify ids are deleted.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path

from bridge import db

log = logging.getLogger("bridge.store")

CLEANUP_EVERY = 600.0  # s between deletions of notify ids older than store.dedup_hours
CHECKPOINT_EVERY = 0.1  # s: small checkpoints, so the database's fsync is small too
RESTART_FRAMES = 1000  # WAL pages (of db.PAGE_SIZE in a new database) before it starts over
RESTART_BUSY = 0.02  # s
RETRY_EVERY = 60.0  # s: PostgreSQL out of reach, the cleanup is tried again after this


class Maintenance:
    """`start()` after the store is open, `stop()` before it closes."""

    def __init__(
        self, path: Path, *, synchronous: str, dedup_hours: float, url: str | None = None
    ) -> None:
        self.path = path
        self.url = url
        self.synchronous = synchronous
        self.dedup_seconds = dedup_hours * 3600
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        run = self._run if self.url is None else self._run_postgres
        self._thread = threading.Thread(target=run, name="store-maintenance", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        """Checkpoint every 0.1 s and forget old notify ids now and then. Often, so that
        each checkpoint's fsync of the database is small: one after a second of heavy
        load flushed megabytes, and the commits behind it waited 100 ms+."""
        conn = db.connect(self.path, self.synchronous, db.SMALL_CACHE_KIB)
        # RESTART waits this long for readers (and blocks new writers meanwhile), no more
        conn.execute(f"PRAGMA busy_timeout={int(RESTART_BUSY * 1000)}")
        next_cleanup = 0.0
        try:
            while not self._stopping.wait(CHECKPOINT_EVERY):
                try:
                    checkpoint(conn)
                    if time.monotonic() >= next_cleanup:
                        cutoff = time.time() - self.dedup_seconds
                        with conn:
                            conn.execute("DELETE FROM seen WHERE at < ?", (cutoff,))
                        next_cleanup = time.monotonic() + CLEANUP_EVERY
                except sqlite3.OperationalError as exc:
                    # busy: a long write has the store (the resync of a large fleet at
                    # start, say), and the next turn tries again
                    if not db.is_busy(exc):
                        log.warning("store maintenance could not run: %s", exc)
                except sqlite3.Error as exc:
                    log.warning("store maintenance could not run: %s", exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()


    def _run_postgres(self) -> None:
        """Forget old notify ids every CLEANUP_EVERY seconds, on a connection opened for
        it; a database out of reach is tried again a minute later."""
        assert self.url is not None
        errors = db.postgres_errors()
        delay = 0.0
        while not self._stopping.wait(delay):
            cutoff = time.time() - self.dedup_seconds
            try:
                conn = db.connect_postgres(self.url, "esim-bridge-upkeep")
                with contextlib.closing(conn):
                    conn.execute("DELETE FROM seen WHERE at < %s", (cutoff,))
            except errors as exc:
                log.warning("store maintenance could not run: %s", exc)
                delay = RETRY_EVERY
            else:
                delay = CLEANUP_EVERY


def checkpoint(conn: sqlite3.Connection) -> None:
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
            if not db.is_busy(exc):
                raise  # busy: a reader stayed longer than RESTART_BUSY; next time
