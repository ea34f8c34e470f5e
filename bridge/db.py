"""SQLite connections as the bridge opens them, for the webhook process and the publisher;
and the publisher's and the upkeep's PostgreSQL connections (`store.url`).

One file, several connections in WAL mode: the webhook process's writer, the
maintenance thread, and the publisher process's reader and deleter. Each waits for
another writer in its own way (see `is_busy`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

# New databases use 1 KB pages. A commit writes each page it touched whole, to the WAL
# and later again into the database; one webhook touches ~10 pages (outbox, dedup,
# state, indexes): 13 KB per acknowledgement at 1 KB against 29 KB at SQLite's default
# 4 KB. Less to fsync, fewer stalls on a busy disk, less wear on an SD card.
PAGE_SIZE = 1024
SMALL_CACHE_KIB = 256  # page cache of the connections that only look things up


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


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the lock (SQLITE_BUSY or _LOCKED, any extended code):
    nothing is wrong, try again later."""
    return exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def connect_postgres(url: str, application_name: str = "esim-bridge") -> Any:
    """A psycopg connection in autocommit (each statement commits by itself), for the
    publisher's reads and deletes and the upkeep's cleanup on PostgreSQL. Imported here:
    psycopg only with esim-bridge[postgres], and only when store.url is set."""
    import psycopg

    return psycopg.connect(
        url, autocommit=True, connect_timeout=3, keepalives=1, keepalives_idle=5,
        keepalives_interval=2, keepalives_count=3, application_name=application_name,
    )


def postgres_errors() -> tuple[type[Exception], ...]:
    import psycopg

    return (psycopg.Error,)
