"""Provider sync: the provider's API as a second source of state.

With `provider.access_code` set, the bridge reads every profile of the account at start
and every `provider.sync_minutes`, the data used by the eSIMs in use every
`provider.usage_minutes`, and an order's profiles once its ORDER_STATUS says GOT_RESOURCE.
The store says which orders wait for that (`Store.pending_orders`), so an order is
resolved whichever replica took its webhook, and after a restart too. What it reads
becomes `Reading`s that enter the store through the same transaction, merge and
out-of-order rule as a webhook (`store.Poll`). Nothing here runs on the webhook path: a
provider that hangs delays only this.

`<base>/bridge/provider` says how the last call went (ok, unauthorized, unreachable,
error), `<base>/bridge/balance` the account's balance, `<base>/bridge/last_sync` when
every profile was last read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from functools import partial
from typing import Any

from bridge.committer import Committer
from bridge.config import ProviderConfig
from bridge.outbox import Message
from bridge.provider import USAGE_BATCH as USAGE_PER_CALL
from bridge.provider import Profile, ProviderClient, ProviderError, Usage
from bridge.store import Poll, Store, StoreUnavailable
from bridge.topics import Reading, Topics, Value, iso

log = logging.getLogger("bridge.sync")

# Readings per write: each is a transaction of its own, applied on the event loop (a
# new eSIM, with its discovery config, costs ~0.3 ms), so webhooks never wait long
# behind a sync of thousands: 50 held them up to 80 ms on a busy machine.
CHUNK = 5
# After each write the sync rests as long as the write took: it uses at most about half
# of the event loop (and of the publisher's time), so webhooks keep their pace while
# thousands of new eSIMs arrive (a fleet of 3,000 then takes ~6 s instead of ~3).
REST = 1.0
REFRESH_EVERY = 60.0  # s: a refresh command is taken at most this often, per eSIM and in all
RETRY = (60.0, 3600.0)  # s: after a failed round, the first wait, and the longest
# s: how often the store is asked for pending orders: those another replica took, or that
# a bridge stopped before resolving (this process's own are resolved at once)
LOOK_EVERY = 12.0


def profile_reading(profile: Profile, activation: bool = False) -> Reading | None:
    """The contract's fields of one profile; None without an iccid. The QR code's URL
    only with `activation` (provider.publish_activation): it installs the eSIM."""
    if not profile.iccid:
        return None
    found: dict[str, Value | None] = {
        "status": profile.esim_status,
        "smdp_status": profile.smdp_status,
        "eid": profile.eid or None,
        "order_no": profile.order_no,
        "transaction_id": profile.transaction_id,
        "expires_at": iso(profile.expires_at) if profile.expires_at else None,
        "activated_at": iso(profile.activated_at) if profile.activated_at else None,
        "validity_total": profile.total_duration,
        "validity_unit": profile.duration_unit,
        "package": profile.package,
        "qr_code_url": profile.qr_code_url if activation else None,
    }
    data: dict[str, Value] = {}
    total, used = profile.total_volume, profile.order_usage
    if isinstance(total, int):
        data["data_total"] = total
        if isinstance(used, int):
            data.update(data_used=used, data_remaining=total - used)
    fields = {key: value for key, value in found.items() if value is not None}
    return Reading(profile.iccid, profile.esim_tran_no, fields, data)


def usage_reading(iccid: str, usage: Usage) -> Reading | None:
    """A usage answer as data counters, timed by its lastUpdateTime."""
    total, used, updated = usage.total_data, usage.data_usage, usage.updated_at
    if not isinstance(total, int) or not isinstance(used, int) or updated is None:
        return None
    data: dict[str, Value] = {"data_total": total, "data_used": used,
                              "data_remaining": total - used, "data_updated_at": iso(updated)}
    return Reading(iccid, usage.esim_tran_no, {}, data, updated.timestamp())


class Sync:
    """Runs the three loops for as long as `run()` is awaited (the app's lifespan).
    `look_every` is there for tests to shorten."""

    def __init__(
        self, client: ProviderClient, committer: Committer, store: Store, topics: Topics,
        settings: ProviderConfig, look_every: float = LOOK_EVERY,
    ) -> None:
        self.client = client
        self.committer = committer
        self.store = store
        self.topics = topics
        self.settings = settings
        self.synced = asyncio.Event()  # set after the first complete sync
        self.look_every = look_every
        self._orders: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()  # orders in `_orders`, or being resolved
        self._failed: set[str] = set()  # left alone until the next full sync round
        self._status: str | None = None
        self._refreshed: dict[str, float] = {}  # what a refresh named -> when (monotonic)
        self._tasks: set[asyncio.Task[bool]] = set()

    def order_ready(self, order_no: str) -> None:
        """An ORDER_STATUS GOT_RESOURCE was stored by this process: read that order's
        profiles now, without waiting for the next look at the store."""
        self._queue_order(order_no)

    def refresh(self, target: str) -> None:
        """A refresh command for an iccid, or `bridge` for everything: read it again now,
        unless the same was read on a command less than a minute ago (a button pressed
        in a hurry, an automation in a loop: the provider allows 8 calls a second)."""
        now = asyncio.get_running_loop().time()
        if now - self._refreshed.get(target, -REFRESH_EVERY) < REFRESH_EVERY:
            log.info("refresh of %s ignored: the last one was less than a minute ago", target)
            return
        self._refreshed[target] = now
        work = self.refresh_all if target == "bridge" else partial(self.refresh_esim, target)
        task = asyncio.create_task(self._attempt(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def refresh_all(self) -> None:
        await self.sync_all()
        await self.poll_usage()

    async def refresh_esim(self, iccid: str) -> None:
        """One eSIM's profile, and its data used if it is in use."""
        profile = await self.client.profile(iccid)
        reading = (profile_reading(profile, self.settings.publish_activation)
                   if profile is not None else None)
        if reading is None:
            log.info("refresh of %s: the provider's API does not list it", iccid)
            return
        await self._store([reading])
        if profile is not None and profile.esim_status == "IN_USE" and profile.esim_tran_no:
            usages = await self.client.usage([profile.esim_tran_no])
            found = [r for r in (usage_reading(iccid, u) for u in usages) if r is not None]
            await self._store(found)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._every(self.settings.sync_minutes * 60, self.sync_all))
            tasks.create_task(self._usage())
            tasks.create_task(self._resolve_orders())

    # -- the three loops ------------------------------------------------------------------

    async def _every(self, seconds: float, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Do `work` now and every `seconds`; a round that failed is tried again sooner (1
        minute, doubling), never more often."""
        retry = RETRY[0]
        while True:
            wait = seconds
            if not await self._attempt(work):
                wait, retry = min(retry, seconds), min(retry * 2, RETRY[1])
            else:
                retry = RETRY[0]
            await asyncio.sleep(wait)

    async def _usage(self) -> None:
        await self.synced.wait()  # usage is asked for the eSIMs the sync found in use
        await self._every(self.settings.usage_minutes * 60, self.poll_usage)

    async def _resolve_orders(self) -> None:
        """Resolve the pending orders one at a time: those the store holds, looked for at
        start and every `look_every`, and those `order_ready` names in between. The store
        is read only while no order is being resolved: what it says is never older than
        the last resolution."""
        # what was named before this run (while another replica called the provider, say)
        # may have been resolved since: the first look says what is still pending
        while not self._orders.empty():
            self._orders.get_nowait()
        self._queued.clear()
        loop = asyncio.get_running_loop()
        while True:
            await self._look_for_orders()
            look_at = loop.time() + self.look_every
            while (order_no := await self._next_order(look_at)) is not None:
                await self._resolve(order_no)

    async def _look_for_orders(self) -> None:
        """Queue every order the store says is pending, whichever replica stored it."""
        try:
            pending = await asyncio.to_thread(self.store.pending_orders)
        except StoreUnavailable as exc:
            log.warning("could not look for pending orders (%s); looking again later", exc)
            return
        for order_no in pending:
            self._queue_order(order_no)

    def _queue_order(self, order_no: str) -> None:
        """Resolve an order soon, unless it is queued already or failed this round."""
        if order_no not in self._queued and order_no not in self._failed:
            self._queued.add(order_no)
            self._orders.put_nowait(order_no)

    async def _next_order(self, until: float) -> str | None:
        """The next order queued, waited for until `until` (the loop's clock); None then."""
        wait = until - asyncio.get_running_loop().time()
        if wait <= 0:
            return None
        try:
            return await asyncio.wait_for(self._orders.get(), wait)
        except TimeoutError:
            return None

    async def _resolve(self, order_no: str) -> None:
        """Resolve one order; one that fails (the provider still allocating past
        `order_wait`, an unknown order, no answer) waits for the next full sync round,
        rather than being asked for again at every look."""
        try:
            if not await self._attempt(partial(self.resolve_order, order_no)):
                log.info("order %s: its eSIMs could not be read; trying again with the next "
                         "full sync", order_no)
                self._failed.add(order_no)
        finally:
            self._queued.discard(order_no)

    async def _attempt(self, work: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Run one round; a refusal or a store that cannot write is logged, not raised."""
        try:
            await work()
        except ProviderError as exc:
            await self._report(exc.outcome, exc)
            return False
        except StoreUnavailable as exc:
            log.warning("the provider's answer could not be stored (%s); trying again later",
                        exc)
            return False
        await self._report("ok")
        return True

    # -- the work -------------------------------------------------------------------------

    async def sync_all(self) -> None:
        """The balance, then every profile of the account; `last_sync` once all are in. A
        round also lets the orders that failed be tried again (at the next look)."""
        self._failed.clear()
        balance = await self.client.balance()
        await self.committer.post([self._retained(self.topics.balance, f"{balance.usd:.2f}")])
        seen: set[str] = set()
        chunk: list[Reading] = []
        async for profile in self.client.all_profiles():
            reading = profile_reading(profile, self.settings.publish_activation)
            # a reused ICCID is listed for each of its eSIMs, the newest first
            if reading is None or reading.iccid in seen:
                continue
            seen.add(reading.iccid)
            chunk.append(reading)
            if len(chunk) >= CHUNK:
                await self._store(chunk)
                chunk = []
        await self._store(chunk)
        now = iso(datetime.now(UTC))
        await self.committer.post([self._retained(self.topics.last_sync, now)])
        log.info("read %d eSIMs from the provider's API", len(seen))
        self.synced.set()

    async def poll_usage(self) -> None:
        """Data used by every eSIM in use, 10 to a call."""
        in_use = dict((tran, iccid) for iccid, tran in await asyncio.to_thread(self.store.in_use))
        numbers = list(in_use)
        for start in range(0, len(numbers), USAGE_PER_CALL):  # each answer stored as it comes
            usages = await self.client.usage(numbers[start:start + USAGE_PER_CALL])
            readings = [usage_reading(in_use[u.esim_tran_no], u) for u in usages
                        if u.esim_tran_no in in_use]
            await self._store([reading for reading in readings if reading is not None])

    async def resolve_order(self, order_no: str) -> None:
        """An order's profiles (the provider may need some seconds to allocate them), and
        `<base>/order/<orderNo>/esims`."""
        profiles = await self.client.profiles_of_order(order_no)
        activation = self.settings.publish_activation
        readings = [r for r in (profile_reading(p, activation) for p in profiles) if r is not None]
        await self._store(readings, order_no)
        log.info("order %s: %d eSIMs", order_no, len(readings))

    async def _store(self, readings: list[Reading], order_no: str | None = None) -> None:
        if readings or order_no:
            started = time.monotonic()
            await self.committer.submit(Poll(readings, datetime.now(UTC), order_no))
            await asyncio.sleep((time.monotonic() - started) * REST)

    # -- status ---------------------------------------------------------------------------

    async def _report(self, outcome: str, error: ProviderError | None = None) -> None:
        """`<base>/bridge/provider`, and a log line a person can act on, when it changes."""
        if outcome == self._status:
            return
        if error is not None:
            log.error("the provider's API: %s (%s)", error, outcome)
        elif self._status is not None:
            log.info("the provider's API answers again")
        try:
            await self.committer.post([self._retained(self.topics.provider, outcome)])
        except StoreUnavailable:
            return  # said again on the next change... or the next round
        self._status = outcome

    @staticmethod
    def _retained(topic: str, text: str) -> Message:
        return Message(topic, text.encode(), True)
