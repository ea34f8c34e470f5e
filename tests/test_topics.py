"""The pure mapping: this event, on top of this record, gives these messages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from bridge import topics
from bridge.models import decode
from bridge.topics import (
    RESERVED,
    Entity,
    Message,
    Record,
    Topics,
    iso,
    percent,
    retained,
    route,
)
from tests.processes import FIXTURES

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@dataclass
class Planned:
    """What one webhook gives: route and plan together, as the store calls them."""

    messages: list[Message]
    record: Record | None
    entity: Entity | None
    warning: str | None
    notice: str | None
    iccid: str | None


def plan(raw_decoded: object, raw: bytes, prior: Record | None, now: datetime,
         base: str) -> Planned:
    decoded = decode(raw)
    to = route(decoded)
    result = topics.plan(to, decoded, raw, prior, now, Topics(base))
    iccid = to.entity.name if to.entity and to.entity.kind == "esim" else decoded.iccid
    return Planned(result.messages, result.record, to.entity, to.warning, result.notice, iccid)


def snapshot(key: str, record: Record, base: str) -> list[Message]:
    return retained(Entity.parse(key), record, Topics(base))


def body(notify_type: str, content: dict[str, object], **top: object) -> bytes:
    return json.dumps({"notifyType": notify_type, **top, "content": content}).encode()


def run(raw: bytes, prior: Record | None = None, base: str = "esim") -> tuple[dict[str, bytes],
                                                                               list[Message]]:
    result = plan(decode(raw), raw, prior, NOW, base)
    retained = {m.topic: m.payload for m in result.messages if m.retain}
    return retained, result.messages


ICCID = "8943108170001029631"
P = f"esim/{ICCID}"

# notify type, content -> retained value topics expected (besides state)
CASES: list[tuple[str, dict[str, object], dict[str, bytes]]] = [
    ("DATA_USAGE", {"iccid": ICCID, "totalVolume": 1000, "orderUsage": 900, "remain": 100},
     {f"{P}/data_total": b"1000", f"{P}/data_used": b"900", f"{P}/data_remaining": b"100",
      f"{P}/data_remaining_percent": b"10.0"}),
    # zero total: no percent, no division by zero
    ("DATA_USAGE", {"iccid": ICCID, "totalVolume": 0, "remain": 0},
     {f"{P}/data_total": b"0", f"{P}/data_remaining": b"0"}),
    # only remain: no percent without a total
    ("DATA_USAGE", {"iccid": ICCID, "remain": 5}, {f"{P}/data_remaining": b"5"}),
    # huge numbers stay exact integers
    ("DATA_USAGE", {"iccid": ICCID, "totalVolume": 2**62, "remain": 2**61},
     {f"{P}/data_total": str(2**62).encode(), f"{P}/data_remaining": str(2**61).encode(),
      f"{P}/data_remaining_percent": b"50.0"}),
    # numbers as strings
    ("DATA_USAGE", {"iccid": ICCID, "totalVolume": "3", "remain": "1"},
     {f"{P}/data_total": b"3", f"{P}/data_remaining": b"1",
      f"{P}/data_remaining_percent": b"33.3"}),
    ("SMDP_EVENT", {"iccid": ICCID, "eid": "E1", "esimStatus": "IN_USE", "smdpStatus": "ENABLED"},
     {f"{P}/eid": b"E1", f"{P}/status": b"IN_USE", f"{P}/smdp_status": b"ENABLED"}),
    # an unknown status value is published as is
    ("ESIM_STATUS", {"iccid": ICCID, "esimStatus": "SOMETHING_NEW"},
     {f"{P}/status": b"SOMETHING_NEW"}),
    ("ESIM_STATUS", {"iccid": ICCID}, {}),
    ("VALIDITY_USAGE", {"iccid": ICCID, "expiredTime": "2024-01-11T08:10:19+0000", "remain": 1,
                        "durationUnit": "DAY", "totalDuration": 30},
     {f"{P}/expires_at": b"2024-01-11T08:10:19+00:00", f"{P}/validity_remaining": b"1"}),
    # a time without a zone is taken as UTC
    ("VALIDITY_USAGE", {"iccid": ICCID, "expiredTime": "2024-01-11T08:10:19"},
     {f"{P}/expires_at": b"2024-01-11T08:10:19+00:00"}),
]


@pytest.mark.parametrize(("notify_type", "content", "values"), CASES)
def test_value_topics(notify_type: str, content: dict[str, object],
                      values: dict[str, bytes]) -> None:
    raw = body(notify_type, content)
    retained, messages = run(raw)
    assert retained == {**values, f"{P}/state": retained[f"{P}/state"]}
    assert [(m.topic, m.payload) for m in messages if not m.retain] == [
        (f"{P}/event", raw), (f"esim/event/{notify_type}", raw),
    ]
    state = json.loads(retained[f"{P}/state"])
    assert state["iccid"] == ICCID and state["last_event"] == notify_type


def test_value_topics_come_before_state_and_events() -> None:
    _, messages = run((FIXTURES / "data_usage.json").read_bytes())
    kinds = [m.topic.rsplit("/", 1)[1] for m in messages]
    assert kinds[-3:] == ["state", "event", "DATA_USAGE"]


def test_state_keys_are_the_contracts_and_times_are_iso_utc() -> None:
    raw = (FIXTURES / "data_usage.json").read_bytes()
    retained, _ = run(raw)
    state = json.loads(retained[f"{P}/state"])
    assert list(state) == ["iccid", "order_no", "esim_tran_no", "transaction_id", "data_total",
                           "data_used", "data_remaining", "data_remaining_percent",
                           "remain_threshold", "data_updated_at", "last_event",
                           "last_event_at", "last_notify_id"]
    assert state["data_updated_at"] == "2025-07-21T09:38:25+00:00"
    assert state["last_event_at"] == "2025-07-21T10:57:28+00:00"


def test_event_without_time_counts_as_received_now() -> None:
    raw = (FIXTURES / "validity_usage.json").read_bytes()
    retained, _ = run(raw)
    state = json.loads(retained["esim/894310817000000003/state"])
    assert state["last_event_at"] == iso(NOW)


def test_stale_event_keeps_newer_fields_and_merges_the_rest() -> None:
    newer = body("ESIM_STATUS", {"iccid": ICCID, "esimStatus": "IN_USE"},
                 eventGenerateTime="2025-01-02T00:00:00Z", notifyId="n2")
    older = body("SMDP_EVENT", {"iccid": ICCID, "esimStatus": "GOT_RESOURCE", "eid": "E1"},
                 eventGenerateTime="2025-01-01T00:00:00Z", notifyId="n1")
    first = plan(decode(newer), newer, None, NOW, "esim")
    retained, messages = run(older, first.record)
    # the status the newer event set stays; the eid nobody had set is taken
    assert f"{P}/status" not in retained
    assert retained[f"{P}/eid"] == b"E1"
    state = json.loads(retained[f"{P}/state"])
    assert state["status"] == "IN_USE"
    assert state["eid"] == "E1"
    assert state["last_notify_id"] == "n2" and state["last_event"] == "ESIM_STATUS"
    # the stale event still goes to the event topics
    assert [m.topic for m in messages if not m.retain] == [f"{P}/event", "esim/event/SMDP_EVENT"]


def test_same_time_overwrites() -> None:
    at = "2025-01-01T00:00:00Z"
    a = body("ESIM_STATUS", {"iccid": ICCID, "esimStatus": "A"}, eventGenerateTime=at)
    b = body("ESIM_STATUS", {"iccid": ICCID, "esimStatus": "B"}, eventGenerateTime=at)
    first = plan(decode(a), a, None, NOW, "esim")
    retained, _ = run(b, first.record)
    assert retained[f"{P}/status"] == b"B"


def test_order_status_and_stale_order_status() -> None:
    new = body("ORDER_STATUS", {"orderNo": "B1", "orderStatus": "GOT_RESOURCE"},
               eventGenerateTime="2025-01-02T00:00:00Z")
    old = body("ORDER_STATUS", {"orderNo": "B1", "orderStatus": "PROCESSING"},
               eventGenerateTime="2025-01-01T00:00:00Z")
    first = plan(decode(new), new, None, NOW, "esim")
    assert [(m.topic, m.payload, m.retain) for m in first.messages] == [
        ("esim/order/B1/status", b"GOT_RESOURCE", True), ("esim/event/ORDER_STATUS", new, False)]
    retained, messages = run(old, first.record)
    assert retained == {}
    assert [m.topic for m in messages] == ["esim/event/ORDER_STATUS"]


def test_check_health_publishes_only_health_and_event() -> None:
    raw = (FIXTURES / "check_health.json").read_bytes()
    result = plan(decode(raw), raw, None, NOW, "esim")
    assert [(m.topic, m.payload, m.retain) for m in result.messages] == [
        ("esim/bridge/last_health_check", iso(NOW).encode(), True),
        ("esim/event/CHECK_HEALTH", raw, False),
    ]


@pytest.mark.parametrize(
    "bad", ["89 43", "89/43", "#", "+", "", "x" * 65, "ÄÖ", *sorted(RESERVED)]
)
def test_bad_segments_go_to_invalid(bad: str) -> None:
    raw = body("ESIM_STATUS", {"iccid": bad, "esimStatus": "IN_USE"})
    result = plan(decode(raw), raw, None, NOW, "esim")
    assert [(m.topic, m.retain) for m in result.messages] == [("esim/event/INVALID", False)]
    assert result.warning and result.record is None
    assert route(decode(raw)).entity is None


def test_bad_order_no_and_notify_type_go_to_invalid() -> None:
    raw = body("ORDER_STATUS", {"orderNo": "a/b", "orderStatus": "X"})
    assert [m.topic for m in plan(decode(raw), raw, None, NOW, "esim").messages] == [
        "esim/event/INVALID"]
    raw = body("NEW TYPE", {"iccid": ICCID})
    assert [m.topic for m in plan(decode(raw), raw, None, NOW, "esim").messages] == [
        "esim/event/INVALID"]


def test_unknown_type_is_raw_on_its_event_topic() -> None:
    raw = body("SOMETHING_ELSE", {"iccid": ICCID})
    result = plan(decode(raw), raw, None, NOW, "esim")
    assert [(m.topic, m.payload) for m in result.messages] == [("esim/event/SOMETHING_ELSE", raw)]
    assert result.warning


def test_missing_iccid_publishes_only_the_event() -> None:
    raw = body("DATA_USAGE", {"remain": 5})
    result = plan(decode(raw), raw, None, NOW, "esim")
    assert [m.topic for m in result.messages] == ["esim/event/DATA_USAGE"]


def test_base_topic_is_used_everywhere() -> None:
    raw = (FIXTURES / "smdp_event.json").read_bytes()
    result = plan(decode(raw), raw, None, NOW, "home/esim")
    assert all(m.topic.startswith("home/esim/") for m in result.messages)


@pytest.mark.parametrize(("remain", "total", "expected"),
                         [(1, 3, 33.3), (2, 3, 66.7), (0, 5, 0.0), (5, 5, 100.0), (1, 2000, 0.1)])
def test_percent_one_decimal(remain: int, total: int, expected: float) -> None:
    assert percent(remain, total) == expected


@pytest.mark.parametrize("name", ["data_usage", "smdp_event", "esim_status", "validity_usage",
                                  "order_status", "check_health"])
def test_snapshot_equals_the_retained_state_plan_left(name: str) -> None:
    """What is republished on connect is exactly what the last events left retained."""
    raw = (FIXTURES / f"{name}.json").read_bytes()
    result = plan(decode(raw), raw, None, NOW, "esim")
    assert result.entity is not None and result.record is not None
    kept = {m.topic: m.payload for m in result.messages if m.retain}
    again = {m.topic: m.payload for m in snapshot(result.entity.key, result.record, "esim")}
    assert again == kept


# -- what a sender gets wrong ------------------------------------------------------------------


def status_at(status: str, when: str | None, notify_id: str) -> bytes:
    top = {"notifyId": notify_id} | ({"eventGenerateTime": when} if when else {})
    return body("ESIM_STATUS", {"iccid": ICCID, "esimStatus": status}, **top)


def test_a_time_far_ahead_of_the_clock_counts_as_received_now() -> None:
    """Believed, one event stamped 2099 would make every later event look older and
    freeze the eSIM's status for good."""
    future = status_at("IN_USE", "2099-01-01T00:00:00Z", "f1")
    first = plan(decode(future), future, None, NOW, "esim")
    assert first.notice and "2099-01-01" in first.notice and first.warning is None
    assert first.record is not None
    assert first.record.fields["last_event_at"] == iso(NOW)
    later = status_at("USED_UP", "2026-01-01T12:30:00Z", "f2")
    second = plan(decode(later), later, first.record, NOW + timedelta(minutes=30), "esim")
    assert (f"{P}/status", b"USED_UP") in [(m.topic, m.payload) for m in second.messages]
    assert second.notice is None


def test_a_time_within_the_hour_ahead_is_believed() -> None:
    """A sender's clock a little fast is not a reason to doubt it."""
    soon = status_at("IN_USE", "2026-01-01T12:59:00Z", "s1")
    result = plan(decode(soon), soon, None, NOW, "esim")
    assert result.notice is None and result.record is not None
    assert result.record.fields["last_event_at"] == "2026-01-01T12:59:00+00:00"


def test_the_last_health_check_is_the_last_one_received_whatever_its_stamp() -> None:
    stamped = body("CHECK_HEALTH", {"orderStatus": "Test"}, notifyId="h1",
                   eventGenerateTime="2099-01-01T00:00:00Z")
    first = plan(decode(stamped), stamped, None, NOW, "esim")
    plain = body("CHECK_HEALTH", {"orderStatus": "Test"}, notifyId="h2")
    later = NOW + timedelta(seconds=5)
    second = plan(decode(plain), plain, first.record, later, "esim")
    assert second.record is not None
    assert second.record.fields["last_health_check"] == iso(later)
    assert snapshot("bridge", second.record, "esim") == [
        Message("esim/bridge/last_health_check", iso(later).encode(), True)]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"totalVolume": 1000, "remain": 5000}, b"100.0"),  # more left than the plan: 100
        ({"totalVolume": 1000, "remain": -5}, b"0.0"),  # overage: 0, the bytes as sent
    ],
)
def test_the_percent_stays_within_0_and_100(content: dict[str, object], expected: bytes) -> None:
    retained, _ = run(body("DATA_USAGE", {"iccid": ICCID, **content}))
    assert retained[f"{P}/data_remaining_percent"] == expected
    assert retained[f"{P}/data_remaining"] == str(content["remain"]).encode()


def test_the_percent_follows_a_remain_sent_without_its_total() -> None:
    first = body("DATA_USAGE", {"iccid": ICCID, "totalVolume": 1000, "remain": 500},
                 notifyId="p1")
    before = plan(decode(first), first, None, NOW, "esim")
    second = body("DATA_USAGE", {"iccid": ICCID, "remain": 100}, notifyId="p2")
    after = plan(decode(second), second, before.record, NOW, "esim")
    values = {m.topic: m.payload for m in after.messages if m.retain}
    assert values[f"{P}/data_remaining_percent"] == b"10.0"
    assert json.loads(values[f"{P}/state"])["data_remaining_percent"] == 10.0


def test_identifiers_sent_as_numbers_are_taken_as_their_digits() -> None:
    raw = body("ESIM_STATUS", {"iccid": ICCID, "esimTranNo": 25080323490020,
                               "transactionId": 7, "orderNo": 123, "esimStatus": "USED_UP"})
    result = plan(decode(raw), raw, None, NOW, "esim")
    assert result.warning is None and result.record is not None
    assert {k: result.record.fields[k] for k in ("esim_tran_no", "transaction_id", "order_no")} == {
        "esim_tran_no": "25080323490020", "transaction_id": "7", "order_no": "123"}
    order = body("ORDER_STATUS", {"orderNo": 42, "orderStatus": "GOT_RESOURCE"})
    topics = [m.topic for m in plan(decode(order), order, None, NOW, "esim").messages]
    assert "esim/order/42/status" in topics


def test_a_raw_event_still_names_its_iccid_for_the_log() -> None:
    raw = body("ESIM_STATUS", {"iccid": ICCID, "esimStatus": 5})
    result = plan(decode(raw), raw, None, NOW, "esim")
    assert result.warning and result.iccid == ICCID
    assert [m.topic for m in result.messages] == ["esim/event/ESIM_STATUS"]


# -- readings of the provider's API ------------------------------------------------------------

LATER = NOW + timedelta(hours=1)


def usage_at(updated: str, remain: int, tran: str = "T1") -> topics.Reading:
    when = datetime.fromisoformat(updated)
    return topics.Reading(ICCID, tran, {}, {"data_total": 1000, "data_used": 1000 - remain,
                                            "data_remaining": remain,
                                            "data_updated_at": iso(when)}, when.timestamp())


def webhook_usage(updated: str, remain: int, egt: str) -> Record:
    raw = body("DATA_USAGE", {"iccid": ICCID, "esimTranNo": "T1", "totalVolume": 1000,
                              "remain": remain, "lastUpdateTime": updated},
               eventGenerateTime=egt)
    record = plan(None, raw, None, NOW, "esim").record
    assert record is not None
    return record


def test_a_usage_reading_with_a_newer_last_update_time_wins_over_a_webhooks_event_time() -> None:
    held = webhook_usage("2026-01-01T09:00:00+00:00", 500, egt="2026-01-01T11:59:00Z")
    result = topics.plan_reading(usage_at("2026-01-01T10:00:00+00:00", 400), held,
                                 NOW.timestamp(), Topics("esim"))
    assert result.record is not None and result.record.fields["data_remaining"] == 400
    assert (f"{P}/data_remaining_percent", b"40.0") in [(m.topic, m.payload)
                                                        for m in result.messages]


def test_a_usage_reading_with_an_older_last_update_time_changes_nothing() -> None:
    held = webhook_usage("2026-01-01T09:00:00+00:00", 500, egt="2026-01-01T09:05:00Z")
    result = topics.plan_reading(usage_at("2026-01-01T08:00:00+00:00", 900), held,
                                 LATER.timestamp(), Topics("esim"))
    assert result.record is not None and result.record.fields["data_remaining"] == 500
    assert [m.topic for m in result.messages] == [f"{P}/state"]


def test_a_webhook_with_older_counters_than_a_reading_leaves_them() -> None:
    reading = topics.plan_reading(usage_at("2026-01-01T10:00:00+00:00", 400), None,
                                  NOW.timestamp(), Topics("esim"))
    raw = body("DATA_USAGE", {"iccid": ICCID, "esimTranNo": "T1", "totalVolume": 1000,
                              "remain": 700, "lastUpdateTime": "2026-01-01T08:00:00Z"},
               eventGenerateTime="2026-01-01T12:30:00Z")
    after = plan(None, raw, reading.record, LATER, "esim")
    assert after.record is not None and after.record.fields["data_remaining"] == 400
    assert after.record.fields["last_event"] == "DATA_USAGE"  # the rest of it is taken


def test_a_usage_reading_of_another_esim_on_the_iccid_changes_nothing() -> None:
    held = webhook_usage("2026-01-01T09:00:00+00:00", 500, egt="2026-01-01T09:05:00Z")
    result = topics.plan_reading(usage_at("2026-01-01T10:00:00+00:00", 1, tran="OTHER"), held,
                                 LATER.timestamp(), Topics("esim"))
    assert result.messages == [] and result.record == held


def test_a_profile_sets_counters_only_where_none_are_known() -> None:
    held = webhook_usage("2026-01-01T09:00:00+00:00", 500, egt="2026-01-01T09:05:00Z")
    profile = topics.Reading(ICCID, "T1", {"status": "IN_USE", "package": "EU 1GB"},
                             {"data_total": 1000, "data_used": 0, "data_remaining": 1000})
    result = topics.plan_reading(profile, held, LATER.timestamp(), Topics("esim"))
    assert result.record is not None
    assert result.record.fields["data_remaining"] == 500
    assert result.record.fields["package"] == "EU 1GB"
    fresh = topics.plan_reading(profile, None, LATER.timestamp(), Topics("esim"))
    assert fresh.record is not None and fresh.record.fields["data_remaining"] == 1000


def test_a_profile_of_another_esim_starts_the_iccid_afresh() -> None:
    held = webhook_usage("2026-01-01T09:00:00+00:00", 500, egt="2026-01-01T09:05:00Z")
    profile = topics.Reading(ICCID, "T2", {"status": "GOT_RESOURCE"}, {})
    result = topics.plan_reading(profile, held, LATER.timestamp(), Topics("esim"))
    assert result.reused and result.record is not None
    assert "data_remaining" not in result.record.fields
    assert result.record.fields["esim_tran_no"] == "T2"


@pytest.mark.parametrize(("fields", "pending"), [
    ({"order_status": "GOT_RESOURCE"}, True),
    ({"order_status": "PROCESSING"}, False),
    ({"order_status": "GOT_RESOURCE", "esims": "[]"}, False),
    ({"esims": '["1"]'}, False),
])
def test_an_order_is_pending_from_got_resource_until_its_esims_are_known(
    fields: dict[str, topics.Value], pending: bool
) -> None:
    assert topics.order_pending(Record(fields)) is pending


def test_an_orders_esims_are_kept_in_its_record_beside_its_status() -> None:
    status = Record({"order_status": "GOT_RESOURCE"}, {"order_status": 1.0})
    plan = topics.plan_order_esims("B1", ["2", "1"], status, 2.0, Topics("esim"))
    assert plan.messages == [Message("esim/order/B1/esims", b'["1","2"]', True)]
    assert plan.record is not None and not topics.order_pending(plan.record)
    assert retained(Entity("order", "B1"), plan.record, Topics("esim")) == [
        Message("esim/order/B1/status", b"GOT_RESOURCE", True), *plan.messages]
