"""A real store, driven from a test the way the bridge drives it: every write goes
through the committer (group commit, the one transaction body), on an event loop. And
PostgreSQL for the tests of `serve` and its replicas: a server of the test's own
(`PostgresServer`) and a relay to one that can be cut or stalled (`Proxy`).

On either backend: a place is a `Path` (SQLite) or a `postgresql://` URL (a database of
the test's own on the PostgreSQL at 127.0.0.1:5432, made by `postgres_database`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
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
from tests.brokers import free_port

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

    def ingest_together(self, raws: list[bytes]) -> list[Accepted]:
        """Store webhook bodies that arrive at the same moment: queued in one turn of the
        event loop, they share a batch (one transaction), in this order."""
        async def submit() -> list[Accepted]:
            now = datetime.now(UTC)
            futures = [self.committer.submit_async(decode(raw), raw, now) for raw in raws]
            return list(await asyncio.gather(*futures))

        return asyncio.run(submit())

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


class PostgresServer:
    """A PostgreSQL of the test's own (initdb, pg_ctl, as the user postgres) on a free
    port, for tests that stop or restart the database: the shared one stays up."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        # not under pytest's tmp_path: the user postgres may not enter root's folders
        self.workdir = Path(tempfile.mkdtemp(prefix="esim-bridge-pg-"))
        self.data = self.workdir / "data"
        self.log_path = self.workdir / "postgres.log"
        self.port = free_port()
        self._as_postgres("chown", "postgres", str(self.workdir), root=True)
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                          "--auth=trust", "-E", "UTF8", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str, root: bool = False) -> None:
        if os.geteuid() != 0:
            argv = ("sudo", *argv) if root else ("sudo", "-u", "postgres", *argv)
        elif not root:
            argv = ("runuser", "-u", "postgres", "--", *argv)
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def _ctl(self, *args: str) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.data} -c fsync=off")
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                          str(self.log_path), "-o", options, "-w", "-t", "30", *args)

    def start(self) -> PostgresServer:
        self._ctl("start")
        return self

    def restart(self) -> None:
        """A fast shutdown (every session ended at once) and a start."""
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        """Stop it, and remove its files."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._ctl("stop", "-m", "immediate")
        self._as_postgres("rm", "-rf", str(self.workdir), root=True)


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("PostgreSQL's server is not installed (apt-get install postgresql)")
    return found[-1].parent


class Proxy:
    """A TCP relay to PostgreSQL that the test can cut (every connection dropped, new
    ones refused) and restore: the database out of reach, without stopping the shared
    server. Or stall: the connections stay open, and nothing passes (a network that
    drops every packet), until `flow()`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()

    @property
    def url_for(self) -> Callable[[str], str]:
        return lambda url: url.replace(f":{self.target[1]}/", f":{self.port}/")

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=3)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile: this one too
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def stall(self) -> None:
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                self._flowing.wait()
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            # close() alone leaves a blocked accept() taking connections (Linux): shutdown
            # wakes it
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
