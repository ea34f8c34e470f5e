"""Orders resolved from the store, on each backend (`place`: SQLite, then PostgreSQL):
the provider sync (`bridge/sync.py`) in this process with a real store, a real client
and the stand-in provider. An order is pending from its stored GOT_RESOURCE until its
`<base>/order/<orderNo>/esims` is stored, whoever stored it and whenever."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from bridge.config import ProviderConfig
from bridge.models import decode
from bridge.provider import ProviderClient
from bridge.sync import Sync
from tests.provider_standin import ProviderStandin
from tests.stores import Driver, Place, open_store

CODE = "standin-access-code"
LOOK_EVERY = 0.2  # s: the bridge looks every 12


def order_status(order_no: str) -> bytes:
    return json.dumps({"notifyType": "ORDER_STATUS", "notifyId": f"order-{order_no}",
                       "content": {"orderNo": order_no, "orderStatus": "GOT_RESOURCE"}}).encode()


def order_queries(standin: ProviderStandin, order_no: str) -> int:
    return sum(1 for r in list(standin.requests)
               if r.path == "esim/query" and r.json().get("orderNo") == order_no)


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() >= deadline:
            raise TimeoutError(f"{what}: not after {timeout}s")
        await asyncio.sleep(0.05)


def esims(store: Driver, order_no: str) -> list[str] | None:
    held = store.retained().get(f"esim/order/{order_no}/esims")
    return None if held is None else list(json.loads(held))


@asynccontextmanager
async def syncing(store: Driver, standin: ProviderStandin, ready: tuple[str, ...] = (),
                  **client: float) -> AsyncIterator[Sync]:
    """The provider sync of the bridge that owns `store`, running (its `run()`); the
    orders `ready` were named to it (`order_ready`) before it ran."""
    settings = ProviderConfig(access_code=CODE, base_url=standin.url, max_rps=5)
    async with ProviderClient(settings, backoff=0.01, **client) as provider:
        sync = Sync(provider, store.committer, store.store, store.store.topics, settings,
                    look_every=LOOK_EVERY)
        for order_no in ready:
            sync.order_ready(order_no)
        task = asyncio.create_task(sync.run())
        try:
            await sync.synced.wait()
            yield sync
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def test_every_pending_order_is_resolved_when_the_sync_starts(place: Place) -> None:
    """Stored before (a bridge stopped before resolving them, or a replica that does not
    call the provider took them): resolved as soon as the sync runs, with no webhook."""
    with ProviderStandin(access_code=CODE) as standin, open_store(place) as store:
        first = standin.allocate("B1", 2)
        second = standin.allocate("B2", 1)
        store.ingest(order_status("B1"))
        store.ingest(order_status("B2"))

        async def scenario() -> None:
            async with syncing(store, standin):
                await until(lambda: not store.store.pending_orders(), "both orders resolved")

        asyncio.run(scenario())
        assert esims(store, "B1") == sorted(str(p["iccid"]) for p in first)
        assert esims(store, "B2") == [str(second[0]["iccid"])]


def test_an_order_another_replica_stored_is_resolved_at_the_next_look(place: Place) -> None:
    """Its webhook went to a replica that does not call the provider: nothing tells this
    one but the store."""
    with ProviderStandin(access_code=CODE) as standin, open_store(place) as store, \
            open_store(place) as standby:
        added = standin.allocate("B3", 1)

        async def scenario() -> None:
            async with syncing(store, standin):
                await asyncio.to_thread(standby.ingest, order_status("B3"))
                await until(lambda: esims(store, "B3") is not None, "the order resolved")

        asyncio.run(scenario())
        assert esims(store, "B3") == [str(added[0]["iccid"])]


def test_an_order_that_keeps_failing_waits_for_the_next_full_sync(place: Place) -> None:
    """The provider still allocates it past `order_wait`: it is asked for again on the
    next full sync round, not at every look (a look every 12 s would ask 5 times a minute
    for as long as it fails)."""
    with ProviderStandin(access_code=CODE) as standin, open_store(place) as store:
        standin.allocate("B4", 1, seconds=3600)

        async def scenario() -> None:
            async with syncing(store, standin, order_wait=0.3, order_poll=0.1) as sync:
                raw = order_status("B4")  # stored on this loop, as the webhook route does
                await store.committer.submit_async(decode(raw), raw, datetime.now(UTC))
                await until(lambda: order_queries(standin, "B4") > 0, "the order asked for")
                await asyncio.sleep(0.3 + 5 * LOOK_EVERY)  # it failed, and was looked at since
                failed = order_queries(standin, "B4")
                await asyncio.sleep(5 * LOOK_EVERY)
                assert order_queries(standin, "B4") == failed
                standin.pending["B4"] = 0  # allocated at last
                await sync.sync_all()
                await until(lambda: esims(store, "B4") is not None, "the order resolved")

        asyncio.run(scenario())
        assert store.store.pending_orders() == []


def test_an_order_named_before_the_sync_ran_and_resolved_since_is_not_asked_for(
    place: Place,
) -> None:
    """A replica is told of its own webhook's order while another calls the provider; by
    the time it takes over, the other has resolved it: the store says so."""
    with ProviderStandin(access_code=CODE) as standin, open_store(place) as store:
        standin.allocate("B5", 1)
        store.ingest(order_status("B5"))
        store.poll([], "B5")  # resolved by the other replica

        async def scenario() -> None:
            async with syncing(store, standin, ready=("B5",)):
                await asyncio.sleep(3 * LOOK_EVERY)

        asyncio.run(scenario())
        assert order_queries(standin, "B5") == 0
