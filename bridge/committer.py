"""Group commit: the writes that arrive together share one transaction, and one fsync.

Everything that changes the store goes through `Committer.submit`: webhooks from the
HTTP route, `bridge/info` from the app, the resync at start. The committer gathers what
is queued into a batch, has `Store.apply` write it on the event loop's own thread, and
COMMITs on a thread of its own, so the loop goes on serving requests (the next batch)
during the fsync, and the GIL changes hands once per batch, not once per statement. A
batch of one or two (light load) commits on the loop itself, where the handoff would
cost more than it saves. On PostgreSQL a batch waits for round trips to the server (two
for a batch of webhooks, `bridge/postgres.py`), which may wait for another replica's lock
or for a stalled network: there the whole batch (begin, apply, COMMIT) runs on the
committer's thread, and the loop never waits on the server.
A write's future resolves only after its COMMIT: for a webhook, the moment the HTTP
layer may answer 200.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import cast

from bridge.models import Decoded
from bridge.outbox import Message
from bridge.store import (
    Accepted,
    Batch,
    Forget,
    Outcome,
    Post,
    Resync,
    Store,
    StoreUnavailable,
    Webhook,
    Write,
)

log = logging.getLogger("bridge.store")

BATCH_LIMIT = 512
# A batch of this many writes or fewer commits on the loop's own thread. So small a
# batch means the loop has little else to do meanwhile, and the committer thread would
# cost two GIL handoffs (0.3 ms at the median, over 1 ms at the 90th percentile, at
# 500 webhooks/s): the median acknowledgement at 500/s fell from 2.0-2.7 to 1.6-2.1 ms.
INLINE_COMMIT = 2
WRITE_BUSY = 0.25  # s: longest wait for another writer (publisher delete, cleanup): then 503
BUSY_TRIES = 20  # ... and at least this many tries (one a millisecond) before giving up

_Queued = tuple[Write, "asyncio.Future[Outcome]"]


class Committer:
    """Batches writes on the event loop and commits them. `close()` after use."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.last_error: str | None = None  # why the last batch failed; None once one works
        self._queue: list[_Queued] = []
        self._scheduled = False
        self._committing = False
        self._busy_since: float | None = None
        self._busy_tries = 0
        self._listeners: list[Callable[[Batch], None]] = []
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="store-commit")

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    def on_commit(self, listener: Callable[[Batch], None]) -> None:
        """Call `listener` with each batch committed that added to the outbox."""
        self._listeners.append(listener)

    # -- what callers submit ------------------------------------------------------------------

    def submit(self, write: Write) -> asyncio.Future[Outcome]:
        """Queue a write; the future resolves after its COMMIT, or fails with
        StoreUnavailable (and then nothing of it was written)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._queue.append((write, future))
        self._schedule(loop)
        return future

    async def submit_async(self, decoded: Decoded, body: bytes, received_at: datetime) -> Accepted:
        """Store one webhook; its `Accepted` once committed."""
        return cast(Accepted, await self.submit(Webhook(decoded, body, received_at)))

    async def post(self, messages: list[Message]) -> int:
        return cast(int, await self.submit(Post(messages)))

    async def resync(self) -> int:
        return cast(int, await self.submit(Resync()))

    async def forget(self) -> int:
        return cast(int, await self.submit(Forget()))

    # -- batching -----------------------------------------------------------------------------

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and not self._committing:
            self._scheduled = True
            loop.call_soon(self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Apply a batch on the loop, then COMMIT it (on the thread, unless small)."""
        self._scheduled = False
        if self._committing or not self._queue:
            return
        if self.store.backend.remote:
            self._flush_remote(loop)
            return
        if not self._begin(loop):
            return  # another writer has the lock: a later turn tries again
        queued = self._take()
        try:
            batch = self.store.apply([write for write, _ in queued])
        except self.store.errors as exc:
            self.store.rollback()
            self._failed(queued, exc, loop)
            return
        self._committing = True
        if len(queued) <= INLINE_COMMIT:
            try:
                self.store.commit(batch)
            except self.store.errors as exc:
                self._done(queued, batch, exc, loop)
            else:
                self._done(queued, batch, None, loop)
            return
        commit = loop.run_in_executor(self._thread, self.store.commit, batch)
        commit.add_done_callback(
            lambda done: self._done(queued, batch, done.exception(), loop)
        )

    def _flush_remote(self, loop: asyncio.AbstractEventLoop) -> None:
        """The whole transaction on the committer's thread (PostgreSQL)."""
        queued = self._take()
        self._committing = True
        work = loop.run_in_executor(self._thread, self._write, [w for w, _ in queued])
        work.add_done_callback(
            lambda done: self._done(queued, None if done.exception() else done.result(),
                                    done.exception(), loop)
        )

    def _write(self, writes: list[Write]) -> Batch:
        """Begin, apply and COMMIT one batch (on the committer's thread)."""
        store = self.store
        store.begin()
        try:
            batch = store.apply(writes)
        except Exception:
            store.rollback()
            raise
        store.commit(batch)
        return batch

    def _begin(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Begin (on SQLite, BEGIN IMMEDIATE) without ever sleeping on the loop. False when
        another writer holds the lock (`_flush` is scheduled again: at once for the first
        millisecond, then every millisecond) or when the queue was failed (the store
        cannot write)."""
        try:
            self.store.begin()
        except self.store.errors as exc:
            now = time.monotonic()
            since = self._busy_since = self._busy_since or now
            self._busy_tries += 1
            # Both a time and a number of tries: a process paused meanwhile (SIGSTOP, a
            # VM stopped) must not wake up past WRITE_BUSY and give up without trying.
            waited = now - since >= WRITE_BUSY and self._busy_tries >= BUSY_TRIES
            if self.store.is_busy(exc) and not waited:
                self._scheduled = True
                if now - since < 0.001:
                    loop.call_soon(self._flush, loop)
                else:
                    loop.call_later(0.001, self._flush, loop)
                return False
            self._busy_since, self._busy_tries = None, 0
            self._fail_queue(exc, loop)
            return False
        except StoreUnavailable as exc:
            self._fail_queue(exc, loop)
            return False
        self._busy_since, self._busy_tries = None, 0
        return True

    def _take(self) -> list[_Queued]:
        """The next batch, in the order queued: the webhooks (and posts) up to the next
        bulk write (a poll of the provider's API, a resync), or that bulk write alone. A
        webhook never shares a transaction with a bulk write, so its answer waits for at
        most one of them, not for one in its own batch as well."""
        count = 0
        while count < min(len(self._queue), BATCH_LIMIT):
            bulk = not isinstance(self._queue[count][0], Webhook | Post)
            if bulk:
                count = count or 1
                break
            count += 1
        queued, self._queue = self._queue[:count], self._queue[count:]
        return queued

    def _fail_queue(self, exc: BaseException, loop: asyncio.AbstractEventLoop) -> None:
        self._failed(self._take(), exc, loop)

    def _done(
        self,
        queued: list[_Queued],
        batch: Batch | None,
        error: BaseException | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._committing = False
        # the next batch first: its statements run, and its COMMIT goes to the thread,
        # before the answers to this one are written (they overlap with that COMMIT)
        if self._queue:
            self._schedule(loop)
        if error is not None or batch is None:
            self._failed(queued, error or StoreUnavailable("no batch"), loop)
            return
        self.last_error = None
        if batch.outbox:
            for listener in self._listeners:
                listener(batch)
        self._settle(queued, batch.outcomes, loop)

    def _failed(
        self, queued: list[_Queued], exc: BaseException, loop: asyncio.AbstractEventLoop
    ) -> None:
        """A batch (or the queue) the store could not write: every write in it fails with
        StoreUnavailable, a 503 for a webhook."""
        error = exc if isinstance(exc, StoreUnavailable) else None
        if error is None:
            self.last_error = f"the store cannot write: {exc}"
            error = StoreUnavailable(self.last_error)
        webhooks = sum(isinstance(write, Webhook) for write, _ in queued)
        log.error("%s (%d webhooks answered 503)", error, webhooks)
        self._settle(queued, [error] * len(queued), loop)

    def _settle(
        self, queued: list[_Queued], outcomes: list[Outcome], loop: asyncio.AbstractEventLoop
    ) -> None:
        for (_, future), outcome in zip(queued, outcomes, strict=True):
            if future.done():
                continue  # the client went away
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if self._queue:
            self._schedule(loop)
