"""The store on PostgreSQL, where several bridges share one database: two stores on one
database stand for two replicas, each with its own connections, committer and event loop
(on a thread of its own), as two processes would have."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

import psycopg
import pytest

from bridge import postgres
from bridge.store import Accepted, StoreUnavailable
from bridge.topics import Entity, Reading
from tests.processes import FIXTURES
from tests.stores import Driver, make_store, open_store, postgres_database

T = TypeVar("T")
ICCID = "8943108170001029631"


@pytest.fixture
def url() -> Iterator[str]:
    with postgres_database() as made:
        yield made


def data_usage(notify_id: str, remain: int, when: datetime, iccid: str = ICCID) -> bytes:
    body = json.loads((FIXTURES / "data_usage.json").read_text())
    body["notifyId"] = notify_id
    body["eventGenerateTime"] = when.isoformat()
    body["content"].update(iccid=iccid, remain=remain)
    return json.dumps(body).encode()


def together(*calls: Callable[[], T]) -> list[T]:
    """Run the calls on threads of their own, released at the same moment."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        start.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_the_same_notify_id_on_two_replicas_at_once_is_taken_once(url: str) -> None:
    with open_store(url) as one, open_store(url) as two:
        start = datetime.now(UTC)
        for n in range(40):
            raw = data_usage(f"twice-{n}", 1000 - n, start + timedelta(seconds=n))
            first, second = together(partial(one.ingest, raw), partial(two.ingest, raw))
            assert sorted([first.duplicate, second.duplicate]) == [False, True], n
        events = [m for _, m in one.outbox() if m.topic == "esim/event/DATA_USAGE"]
    assert len(events) == 40  # each body published once


def test_the_newest_event_wins_whichever_replica_took_it(url: str) -> None:
    """Events of one eSIM spread over two replicas, in random order and at the same
    moments: the state ends at the newest event's (the out-of-order rule), and an event
    older than the state is never applied over it."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    bodies = [data_usage(f"o-{n}", 10_000 - n, start + timedelta(minutes=n)) for n in range(60)]
    order = sorted(range(60), key=lambda n: (n * 37) % 60)  # a fixed shuffle
    with open_store(url) as one, open_store(url) as two:

        def feed(driver: Driver, picks: list[int]) -> list[Accepted]:
            return [driver.ingest(bodies[n]) for n in picks]

        together(lambda: feed(one, order[0::2]), lambda: feed(two, order[1::2]))
        kept = one.retained()
        remaining = [int(m.payload) for _, m in one.outbox()
                     if m.topic == f"esim/{ICCID}/data_remaining"]
    assert kept[f"esim/{ICCID}/data_remaining"] == str(10_000 - 59).encode()
    assert json.loads(kept[f"esim/{ICCID}/state"])["data_remaining"] == 10_000 - 59
    # what was published for the retained topic only ever moved forward
    assert remaining == sorted(remaining, reverse=True)


def test_a_reused_iccid_holds_across_replicas(url: str) -> None:
    """The new eSIM's event on one replica, a late one of the earlier eSIM on the other:
    the state stays the new eSIM's."""
    def event(kind: str, notify_id: str, tran: str, when: str, **content: object) -> bytes:
        return json.dumps({"notifyType": kind, "notifyId": notify_id, "eventGenerateTime": when,
                           "content": {"iccid": ICCID, "esimTranNo": tran, **content}}).encode()

    with open_store(url) as one, open_store(url) as two:
        one.ingest(event("DATA_USAGE", "a1", "OLD", "2026-01-01T00:00:00Z", remain=100))
        together(
            lambda: one.ingest(event("ESIM_STATUS", "b1", "NEW", "2026-02-01T00:00:00Z",
                                     esimStatus="GOT_RESOURCE")),
            lambda: two.ingest(event("DATA_USAGE", "a2", "OLD", "2026-01-02T00:00:00Z",
                                     remain=50)),
        )
        state = json.loads(one.retained()[f"esim/{ICCID}/state"])
    assert state["esim_tran_no"] == "NEW" and "data_remaining" not in state


def test_a_batch_kept_waiting_for_a_lock_fails_whole_and_the_next_is_taken(url: str) -> None:
    """Another replica stalled mid-transaction holds an eSIM's lock: a webhook of that eSIM
    waits `lock_timeout` (2 s), gets StoreUnavailable (a 503) and leaves nothing behind;
    once the lock is free, the same webhook is taken (not a duplicate) on the same store."""
    start = datetime.now(UTC)
    with open_store(url) as store, psycopg.connect(url) as stalled:
        store.ingest(data_usage("before", 20, start))
        stalled.execute("SELECT pg_advisory_xact_lock(%s)",
                        (postgres.lock_id(Entity("esim", ICCID).key),))
        with pytest.raises(StoreUnavailable):
            store.ingest(data_usage("held", 10, start + timedelta(seconds=1)))
        stalled.rollback()
        accepted = store.ingest(data_usage("held", 10, start + timedelta(seconds=1)))
        assert not accepted.duplicate
        assert store.retained()[f"esim/{ICCID}/data_remaining"] == b"10"


def test_an_order_one_replica_stored_is_pending_for_the_other(url: str) -> None:
    """The replica that calls the provider resolves the orders whichever replica took
    their webhook; once it has, the order is pending for neither."""
    order = json.dumps({"notifyType": "ORDER_STATUS", "notifyId": "order-1",
                        "content": {"orderNo": "B1", "orderStatus": "GOT_RESOURCE"}}).encode()
    with open_store(url) as standby, open_store(url) as publishing:
        standby.ingest(order)
        assert publishing.store.pending_orders() == ["B1"]
        publishing.poll([Reading(ICCID, "T1", {"order_no": "B1"}, {})], "B1")
        assert standby.store.pending_orders() == publishing.store.pending_orders() == []


def test_two_replicas_starting_together_create_the_schema_once(url: str) -> None:
    stores = [make_store(url) for _ in range(4)]
    try:
        together(*[store.open for store in stores])
        with psycopg.connect(url) as conn:
            versions = conn.execute("SELECT version FROM store_version").fetchall()
        assert versions == [(1,)]
    finally:
        for store in stores:
            store.close()


def test_postgresql_out_of_reach_at_start_says_where(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "OPEN_WAIT", 1.0)  # it waits 10 s for a database starting
    store = make_store("postgresql://esim:hunter2@127.0.0.1:9/esim")
    with pytest.raises(StoreUnavailable) as raised:
        store.open()
    assert "127.0.0.1:9" in str(raised.value) and "hunter2" not in str(raised.value)


def test_postgresql_gone_is_a_503_and_the_store_recovers_by_itself(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database refuses connections and drops those it had (as in a restart): a webhook
    gets StoreUnavailable (the route's 503); once it is back, webhooks are taken again
    without a restart of the bridge."""
    monkeypatch.setattr(postgres, "OPEN_WAIT", 1.0)  # how long a read waits for a connection
    name = url.rsplit("/", 1)[1]
    admin = psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True)
    start = datetime.now(UTC)
    try:
        with open_store(url) as store:
            assert not store.ingest(data_usage("g0", 10, start)).duplicate
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            with pytest.raises(StoreUnavailable):
                store.ingest(data_usage("g1", 9, start))
            with pytest.raises(StoreUnavailable):  # and again, while it stays away
                store.ingest(data_usage("g1", 9, start))
            # the provider sync's reads say so too (it tries again later), never raise
            # the driver's own error (it would end the sync until a restart)
            with pytest.raises(StoreUnavailable):
                store.store.in_use()
            with pytest.raises(StoreUnavailable):
                store.store.pending_orders()
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            deadline = time.monotonic() + 20
            while True:
                try:
                    accepted = store.ingest(data_usage("g1", 9, start))
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "the store did not recover"
                    time.sleep(0.2)
            assert not accepted.duplicate  # nothing of the failed attempts was kept
            store.db = psycopg.connect(url, autocommit=True)  # the test's own was dropped
            assert store.retained()[f"esim/{ICCID}/data_remaining"] == b"9"
    finally:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        admin.close()
