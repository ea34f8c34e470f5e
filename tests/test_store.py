"""The store on its own, on each backend (`place`: SQLite, then PostgreSQL): what one
acknowledgement costs the disk, the retained table, ICCID reuse, forgetting ended eSIMs."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bridge import outbox
from bridge.topics import Reading
from tests.processes import FIXTURES
from tests.stores import Place, open_store

WEBHOOKS = 100
# Measured: ~15 KB per webhook at 1 KB pages (~13 KB before the table of retained topics),
# ~29 KB at SQLite's default 4 KB pages.
MOST_BYTES_PER_WEBHOOK = 16_000


def test_one_webhook_writes_few_bytes_to_the_wal(tmp_path: Path) -> None:
    """Every commit writes the pages it touched whole, and is fsynced before the answer: the
    bytes per webhook are what the disk (an SD card, often) pays for each acknowledgement."""
    template = json.loads((FIXTURES / "data_usage.json").read_text())
    with open_store(tmp_path / "bridge.db") as store:

        def ingest(n: int) -> None:
            body = dict(template, notifyId=f"wal-{n}")
            body["content"] = dict(template["content"], iccid=f"89000000000000{n % 10:05d}",
                                   remain=5351505742 - n)
            store.ingest(json.dumps(body).encode())

        for n in range(WEBHOOKS):  # the tables are past their first pages
            ingest(n)
        checkpoint = sqlite3.connect(tmp_path / "bridge.db")
        # busy (the store's maintenance thread is checkpointing too): the WAL keeps its
        # size, and the bytes below would count the first round as well; try again
        for _ in range(100):
            if checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0:
                break
            time.sleep(0.01)
        checkpoint.close()
        assert os.path.getsize(tmp_path / "bridge.db-wal") == 0
        for n in range(WEBHOOKS, 2 * WEBHOOKS):  # one webhook per commit: the worst case
            ingest(n)
        written = os.path.getsize(tmp_path / "bridge.db-wal") / WEBHOOKS
    assert written <= MOST_BYTES_PER_WEBHOOK, f"{written:,.0f} bytes per webhook"


# -- the table of retained topics ----------------------------------------------------------------

ICCID = "8943108170001029631"


def data_usage(notify_id: str, remain: int, iccid: str = ICCID) -> bytes:
    body = json.loads((FIXTURES / "data_usage.json").read_text())
    body["notifyId"] = notify_id
    body["content"].update(iccid=iccid, remain=remain)
    return json.dumps(body).encode()


def test_every_retained_message_sent_is_in_the_table_with_its_newest_payload(
    place: Place,
) -> None:
    with open_store(place) as store:
        for n in range(3):
            store.ingest(data_usage(f"r{n}", 1000 - n))
        sent = [m for _, m in store.outbox() if m.retain]
        newest = {m.topic: m.payload for m in sent}
        assert store.retained() == newest
        assert newest[f"esim/{ICCID}/data_remaining"] == b"998"
        assert f"homeassistant/device/esim_{ICCID}/config" in newest


@pytest.mark.parametrize("page", [outbox.SNAPSHOT_PAGE, 3])
def test_the_snapshot_leaves_topics_still_in_the_outbox_to_it(
    place: Place, page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On connect the publisher republishes the table, but not a topic whose messages still
    wait in the outbox: they go out in order and end at the same value, and the newest
    first would show a subscriber 998, then 1000, 999, 998. Read a page at a time (here
    also of 3 topics), it is the whole table all the same."""
    monkeypatch.setattr(outbox, "SNAPSHOT_PAGE", page)
    with open_store(place) as store:
        store.ingest(data_usage("s0", 1000, iccid="1111"))
        (last_sent, _), *_ = store.outbox()[-1:]
        for n in range(3):
            store.ingest(data_usage(f"s{n + 1}", 1000 - n))
        sent = list(outbox.snapshot(store.db, last_sent))
        table = store.retained()
    snapshot = {m.topic: m.payload for m in sent}
    assert len(sent) == len(snapshot), "a topic sent twice"
    assert f"esim/{ICCID}/data_remaining" not in snapshot
    assert f"esim/{ICCID}/state" not in snapshot
    assert snapshot["esim/1111/data_remaining"] == b"1000"
    assert "homeassistant/device/esim_1111/config" in snapshot
    waiting = {t for t in table if t.startswith(f"esim/{ICCID}/")
               or t == f"homeassistant/device/esim_{ICCID}/config"}
    assert snapshot == {t: p for t, p in table.items() if t not in waiting}


def test_a_new_base_topic_moves_every_retained_topic(place: Place) -> None:
    with open_store(place, base="old") as store:
        store.ingest(data_usage("b1", 5))
    with open_store(place, base="new") as store:
        kept = store.retained()
        sent = {m.topic: m.payload for _, m in store.outbox() if m.retain}
    assert kept[f"new/{ICCID}/data_remaining"] == b"5"
    assert not [topic for topic in kept if topic.startswith("old/")]
    assert sent[f"old/{ICCID}/data_remaining"] == b""  # cleared on the broker
    config = json.loads(kept[f"homeassistant/device/esim_{ICCID}/config"])
    assert config["cmps"]["data_remaining"]["state_topic"] == f"new/{ICCID}/data_remaining"


def test_discovery_turned_off_clears_every_config_and_nothing_else(place: Place) -> None:
    with open_store(place) as store:
        store.ingest(data_usage("d1", 5))
        before = store.retained()
    with open_store(place, discovery=False) as store:
        after = store.retained()
        cleared = {m.topic for _, m in store.outbox() if m.retain and not m.payload}
    configs = {topic for topic in before if topic.startswith("homeassistant/")}
    assert configs == {"homeassistant/device/esim_bridge/config",
                       f"homeassistant/device/esim_{ICCID}/config"}
    assert cleared == configs
    assert after == {t: p for t, p in before.items() if t not in configs}


def test_a_store_of_the_version_before_the_retained_table_is_upgraded(tmp_path: Path) -> None:
    """Version 0 kept the configs it sent in a `discovery` table and rebuilt the rest from
    the records on every connect: after the upgrade the table holds both, and a config
    that did not change is not sent again."""
    path = tmp_path / "bridge.db"
    with open_store(path) as store:
        store.ingest(data_usage("u1", 5))
        configs = {t: p for t, p in store.retained().items() if t.startswith("homeassistant/")}
        everything = store.retained()
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(
        "CREATE TABLE discovery (topic TEXT PRIMARY KEY, payload BLOB NOT NULL) WITHOUT ROWID;"
        "DROP TABLE retained; DELETE FROM outbox; PRAGMA user_version = 0;"
    )
    old.executemany("INSERT INTO discovery VALUES (?, ?)", configs.items())
    old.close()
    with open_store(path) as store:
        assert store.retained() == everything
        resent = {m.topic for _, m in store.outbox()}
    assert not resent & set(configs)  # the configs were known to be on the broker already


def test_an_esim_an_older_version_stored_under_a_reserved_name_gets_no_topics(
    place: Place,
) -> None:
    """Before `bridge` was refused as an iccid, it was stored: its topics would write over
    the bridge's own."""
    with open_store(place) as store:
        store.ingest(data_usage("x1", 5))
        store.execute("INSERT INTO entity SELECT 'esim:bridge', record FROM entity WHERE key = ?",
                      (f"esim:{ICCID}",))
    with open_store(place) as store:
        assert not [topic for topic in store.retained() if topic.startswith("esim/bridge/")]


# -- orders --------------------------------------------------------------------------------------


def order_status(order_no: str, status: str = "GOT_RESOURCE") -> bytes:
    return json.dumps({"notifyType": "ORDER_STATUS", "notifyId": f"order-{order_no}-{status}",
                       "content": {"orderNo": order_no, "orderStatus": status}}).encode()


def profile_of(iccid: str, order_no: str) -> Reading:
    return Reading(iccid, f"T-{iccid}", {"order_no": order_no, "status": "GOT_RESOURCE"}, {})


def test_an_orders_esims_stay_on_the_broker_across_a_restart(place: Place) -> None:
    """`<base>/order/<orderNo>/esims` is kept with the order, like its status: the resync at
    start republishes it, it does not clear it (nor does a new base topic lose it)."""
    esims = "esim/order/B1/esims"
    with open_store(place) as store:
        store.ingest(order_status("B1"))
        store.poll([profile_of("8900000000000000002", "B1"),
                    profile_of("8900000000000000001", "B1")], "B1")
        assert store.retained()[esims] == b'["8900000000000000001","8900000000000000002"]'
    with open_store(place) as store:
        assert store.retained()[esims] == b'["8900000000000000001","8900000000000000002"]'
        assert (esims, b"") not in [(m.topic, m.payload) for _, m in store.outbox()]
    with open_store(place, base="new") as store:
        kept = store.retained()
    assert kept["new/order/B1/esims"] == b'["8900000000000000001","8900000000000000002"]'
    assert esims not in kept


def test_an_order_is_pending_from_its_got_resource_until_its_esims_are_stored(
    place: Place,
) -> None:
    with open_store(place) as store:
        store.ingest(order_status("B1"))
        store.ingest(order_status("B2", "PROCESSING"))  # not ready: nothing to read yet
        store.ingest(order_status("B3"))
        store.ingest(data_usage("p1", 5))  # an eSIM is never an order
        assert sorted(store.store.pending_orders()) == ["B1", "B3"]
        store.poll([profile_of("8900000000000000001", "B1")], "B1")
        store.poll([], "B3")  # an order the provider lists no eSIMs for is resolved too
        assert store.store.pending_orders() == []
    with open_store(place) as store:  # after a restart (the resync) as well
        store.ingest(order_status("B4"))
        assert store.store.pending_orders() == ["B4"]


# -- ICCID reuse ---------------------------------------------------------------------------------


def esim_event(kind: str, notify_id: str, tran: str, when: str, **content: object) -> bytes:
    return json.dumps({"notifyType": kind, "notifyId": notify_id, "eventGenerateTime": when,
                       "content": {"iccid": ICCID, "esimTranNo": tran, **content}}).encode()


def test_a_reused_iccid_starts_afresh_and_clears_what_the_new_esim_lacks(place: Place) -> None:
    """The provider gives a used ICCID to a new eSIM (another esimTranNo): nothing of the
    earlier one may carry over, on the broker either."""
    with open_store(place) as store:
        store.ingest(esim_event("DATA_USAGE", "a1", "OLD", "2026-01-01T00:00:00Z",
                                totalVolume=1000, orderUsage=900, remain=100))
        store.ingest(esim_event("SMDP_EVENT", "a2", "OLD", "2026-01-01T01:00:00Z",
                                eid="E-OLD", esimStatus="IN_USE", smdpStatus="ENABLED"))
        before = store.outbox()[-1][0]
        store.ingest(esim_event("ESIM_STATUS", "b1", "NEW", "2026-02-01T00:00:00Z",
                                esimStatus="GOT_RESOURCE", smdpStatus="RELEASED"))
        sent = [m for _, m in store.outbox(before)]
        kept = store.retained()
    p = f"esim/{ICCID}"
    cleared = {m.topic for m in sent if m.retain and not m.payload}
    assert cleared == {f"{p}/{leaf}" for leaf in (
        "data_total", "data_used", "data_remaining", "data_remaining_percent", "eid")}
    state = json.loads(kept[f"{p}/state"])
    assert state["esim_tran_no"] == "NEW" and state["status"] == "GOT_RESOURCE"
    assert not {"eid", "data_remaining", "data_total"} & set(state)
    assert kept[f"{p}/status"] == b"GOT_RESOURCE"
    assert f"{p}/data_remaining" not in kept and f"homeassistant/device/esim_{ICCID}/config" in kept
    # the clears go before the new eSIM's own messages, and its config is not cleared
    topics = [m.topic for m in sent]
    assert topics.index(f"{p}/eid") < topics.index(f"{p}/status")


def test_a_late_event_of_the_earlier_esim_changes_nothing_but_the_event_topics(
    place: Place,
) -> None:
    with open_store(place) as store:
        store.ingest(esim_event("ESIM_STATUS", "n1", "NEW", "2026-02-01T00:00:00Z",
                                esimStatus="IN_USE"))
        before = store.outbox()[-1][0]
        held = store.retained()
        accepted = store.ingest(esim_event("DATA_USAGE", "o1", "OLD", "2026-01-01T00:00:00Z",
                                           totalVolume=1000, remain=5))
        sent = [m for _, m in store.outbox(before)]
        assert store.retained() == held
    assert [(m.topic, m.retain) for m in sent] == [
        (f"esim/{ICCID}/event", False), ("esim/event/DATA_USAGE", False)]
    assert accepted.notice is not None and "earlier eSIM" in accepted.notice


def test_webhooks_in_one_batch_each_see_what_the_one_before_wrote(place: Place) -> None:
    """Webhooks that arrive together share a transaction: each is deduplicated and merged
    against the state as the ones before it in the batch left it (on PostgreSQL the batch
    reads its records and dedup keys ahead, in one statement each)."""
    with open_store(place) as store:
        store.ingest(esim_event("DATA_USAGE", "d0", "T1", "2026-01-01T00:00:00Z", remain=300))
        before = store.outbox()[-1][0]
        outcomes = store.ingest_together([
            esim_event("DATA_USAGE", "d1", "T1", "2026-01-01T02:00:00Z", remain=200),
            esim_event("DATA_USAGE", "d0", "T1", "2026-01-01T00:00:00Z", remain=300),  # seen
            esim_event("DATA_USAGE", "d1", "T1", "2026-01-01T02:00:00Z", remain=200),  # seen
            esim_event("DATA_USAGE", "d2", "T1", "2026-01-01T01:00:00Z", remain=250),  # late
            esim_event("DATA_USAGE", "d3", "T1", "2026-01-01T03:00:00Z", remain=100),
        ])
        sent = [m for _, m in store.outbox(before) if m.topic == f"esim/{ICCID}/data_remaining"]
        kept = store.retained()
    assert [accepted.duplicate for accepted in outcomes] == [False, True, True, False, False]
    assert [m.payload for m in sent] == [b"200", b"100"]  # the late one sets no state
    assert kept[f"esim/{ICCID}/data_remaining"] == b"100"


def test_the_same_esim_without_an_esim_tran_no_is_not_a_reuse(place: Place) -> None:
    with open_store(place) as store:
        store.ingest(esim_event("DATA_USAGE", "s1", "T1", "2026-01-01T00:00:00Z", remain=5))
        raw = json.dumps({"notifyType": "ESIM_STATUS", "notifyId": "s2",
                          "content": {"iccid": ICCID, "esimStatus": "IN_USE"}}).encode()
        store.ingest(raw)
        state = json.loads(store.retained()[f"esim/{ICCID}/state"])
    assert state["data_remaining"] == 5 and state["esim_tran_no"] == "T1"


# -- forgetting ended eSIMs ----------------------------------------------------------------------

CONFIG = f"homeassistant/device/esim_{ICCID}/config"


def expiring(notify_id: str, days_ago: float) -> bytes:
    when = datetime.now(UTC) - timedelta(days=days_ago)
    return json.dumps({"notifyType": "VALIDITY_USAGE", "notifyId": notify_id,
                       "content": {"iccid": ICCID, "durationUnit": "DAY", "totalDuration": 30,
                                   "expiredTime": when.isoformat(), "remain": 0}}).encode()


def test_an_esim_expired_longer_than_forget_ended_days_leaves_home_assistant(
    place: Place,
) -> None:
    """Its discovery config is cleared; its retained topics stay."""
    with open_store(place, forget_ended_days=30) as store:
        store.ingest(expiring("e1", days_ago=10))
        assert store.forget() == 0 and CONFIG in store.retained()
    with open_store(place, forget_ended_days=5) as store:  # at start
        kept = store.retained()
        assert CONFIG not in kept and f"esim/{ICCID}/expires_at" in kept
        assert (CONFIG, b"") in [(m.topic, m.payload) for _, m in store.outbox()]
        assert store.forget() == 0  # once is enough


def test_a_cancelled_esim_is_forgotten_counted_from_when_it_was_cancelled(
    place: Place,
) -> None:
    cancel = json.dumps({"notifyType": "ESIM_STATUS", "notifyId": "c1",
                         "content": {"iccid": ICCID, "esimStatus": "CANCEL"}}).encode()
    with open_store(place, forget_ended_days=1) as store:
        store.ingest(cancel)
        assert store.forget() == 0  # cancelled just now
        assert CONFIG in store.retained()
    with open_store(place, forget_ended_days=0) as store:
        assert CONFIG not in store.retained()
        assert f"esim/{ICCID}/status" in store.retained()


def test_forget_runs_through_the_one_transaction_and_clears_once(place: Place) -> None:
    with open_store(place, forget_ended_days=30) as store:
        store.ingest(expiring("f1", days_ago=40))  # ended long ago: no config from the start
        assert CONFIG not in store.retained()
        store.ingest(data_usage("f2", 5, iccid="1111"))  # alive
        assert store.forget() == 0
        assert "homeassistant/device/esim_1111/config" in store.retained()
