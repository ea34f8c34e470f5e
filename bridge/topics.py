"""This event, on top of this state, gives these MQTT messages: the pure heart.

No I/O here. The store calls `plan` inside its transaction and appends the
messages to the outbox; the publisher only sends them.

State is kept per *entity* (an eSIM, an order, the bridge) as a `Record`: the
contract's state fields plus, for each field, the time of the event that set
it. That time decides the out-of-order rule: a field (and so its value topic)
is only overwritten by an event at least as new as the one that set it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from bridge.models import (
    CheckHealth,
    DataUsage,
    Decoded,
    EsimStatus,
    OrderStatus,
    SmdpEvent,
    ValidityUsage,
)

SEGMENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
INVALID = "INVALID"
# How far ahead of this machine's clock an event's time may be and still be believed.
FUTURE_SLACK = timedelta(hours=1)
# The levels under <base> that are the bridge's own: an eSIM with one of these as its
# iccid would write over `<base>/bridge/state` (every entity's availability), into
# `<base>/event/...` or among the orders. No real ICCID (18 to 22 digits) is one.
RESERVED = frozenset({"bridge", "event", "order"})


def iccid_problem(iccid: str) -> str | None:
    """Why an iccid cannot name an eSIM's topics, or None when it can."""
    if not SEGMENT.match(iccid):
        return f"iccid {iccid!r} cannot be a topic segment"
    if iccid in RESERVED:
        return f"iccid {iccid!r} is a topic level of the bridge's own"
    return None

Value = str | int | float


class Message(msgspec.Struct, frozen=True, array_like=True):
    """One finished MQTT message, as the outbox holds it."""

    topic: str
    payload: bytes
    retain: bool


class Record(msgspec.Struct):
    """What is known about one entity, and when each field was last set."""

    fields: dict[str, Value] = msgspec.field(default_factory=dict)
    times: dict[str, float] = msgspec.field(default_factory=dict)


class Plan(msgspec.Struct):
    """The outcome of one event: the entity it touched and the messages to send.

    `warning`: why it was published raw. `notice`: something odd about an event that
    was still understood (logged as a warning, and counted).
    """

    messages: list[Message]
    entity: str | None = None
    record: Record | None = None
    iccid: str | None = None
    warning: str | None = None
    notice: str | None = None


# A value topic per state field that has one; the rest live only in the state JSON.
VALUE_TOPICS = {
    "status": "status",
    "smdp_status": "smdp_status",
    "eid": "eid",
    "data_total": "data_total",
    "data_used": "data_used",
    "data_remaining": "data_remaining",
    "data_remaining_percent": "data_remaining_percent",
    "expires_at": "expires_at",
    "validity_remaining": "validity_remaining",
}

STATE_KEYS = (
    "iccid", "eid", "order_no", "esim_tran_no", "transaction_id", "status", "smdp_status",
    "data_total", "data_used", "data_remaining", "data_remaining_percent", "remain_threshold",
    "data_updated_at", "expires_at", "validity_remaining", "validity_unit", "validity_total",
    "last_event", "last_event_at", "last_notify_id",
)


def iso(moment: datetime) -> str:
    """ISO 8601 in UTC with an explicit offset; a time without a zone is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


def text(value: Value) -> bytes:
    """A single-value topic's payload: a plain string, no JSON quoting."""
    if isinstance(value, float):
        return repr(value).encode()
    return str(value).encode()


def percent(remain: int, total: int) -> float:
    """`remain / total * 100` to one decimal, within 0 to 100: a remain over the total
    (a provider's slip) or below zero (overage) must not make a gauge read 500 %."""
    return round(min(max(remain / total, 0.0), 1.0) * 100, 1)


def _id(value: str | int | None) -> str | None:
    """An identifier as the string it stands for (a provider may send its digits bare)."""
    return None if value is None else str(value)


def esim_fields(event: SmdpEvent | EsimStatus | DataUsage | ValidityUsage) -> dict[str, Value]:
    """The state fields an eSIM event carries (only those present)."""
    c = event.content
    found: dict[str, Any] = {
        "order_no": _id(c.order_no),
        "esim_tran_no": _id(c.esim_tran_no),
        "transaction_id": _id(c.transaction_id),
    }
    if isinstance(event, SmdpEvent | EsimStatus):
        found.update(eid=event.content.eid, status=event.content.esim_status,
                     smdp_status=event.content.smdp_status)
    elif isinstance(event, DataUsage):
        d = event.content
        found.update(
            data_total=d.total_volume,
            data_used=d.order_usage,
            data_remaining=d.remain,
            remain_threshold=d.remain_threshold,
            data_updated_at=iso(d.last_update_time) if d.last_update_time else None,
        )
    else:
        v = event.content
        found.update(
            expires_at=iso(v.expired_time) if v.expired_time else None,
            validity_remaining=v.remain,
            validity_unit=v.duration_unit,
            validity_total=v.total_duration,
        )
    return {key: value for key, value in found.items() if value is not None}


def merge(prior: Record | None, fields: dict[str, Value], at: float) -> tuple[Record, list[str]]:
    """Apply fields from an event at time `at`; returns the new record and what changed.

    A field set by a newer event keeps its value: stale events never overwrite.
    """
    record = Record(dict(prior.fields), dict(prior.times)) if prior else Record()
    applied: list[str] = []
    for key, value in fields.items():
        if record.times.get(key, float("-inf")) > at:
            continue
        record.fields[key] = value
        record.times[key] = at
        applied.append(key)
    return record, applied


def state_payload(record: Record) -> bytes:
    """The `<base>/<iccid>/state` JSON: contract keys, in the contract's order."""
    ordered = {key: record.fields[key] for key in STATE_KEYS if key in record.fields}
    return msgspec.json.encode(ordered)


def event_moment(decoded: Decoded, received_at: datetime) -> tuple[datetime, str | None]:
    """When an event happened, for ordering it against others: its eventGenerateTime,
    else when it was received. A time more than FUTURE_SLACK ahead of the bridge's own
    clock counts as received now, with a notice: believed, one event stamped 2099 would
    make every later one look older, and freeze its eSIM's state for good."""
    moment = decoded.event_time
    if moment is None:
        return received_at, None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        believable = moment <= received_at + FUTURE_SLACK
    except OverflowError:  # 9999-12-31T23:59:59-01:00: no such time in UTC
        believable = False
    if not believable:
        return received_at, (
            f"eventGenerateTime {moment.isoformat()} is more than an hour ahead of this "
            "machine's clock: the event counts as received now"
        )
    return moment, None


def plan(
    decoded: Decoded,
    body: bytes,
    prior: Record | None,
    received_at: datetime,
    base: str,
) -> Plan:
    """The messages one accepted webhook produces, given the prior record of its entity.

    The caller looks the entity up with `entity_key(decoded)` before calling this.
    """
    moment, notice = event_moment(decoded, received_at)
    result = _plan(decoded, body, prior, received_at, moment, base)
    if notice is not None and result.warning is None:
        result.notice = notice
    return result


def _plan(
    decoded: Decoded,
    body: bytes,
    prior: Record | None,
    received_at: datetime,
    moment: datetime,
    base: str,
) -> Plan:
    notify_type = decoded.notify_type
    event = decoded.event
    event_topic = Message(f"{base}/event/{notify_type}", body, retain=False)
    at = moment.timestamp()

    if not SEGMENT.match(notify_type):
        return Plan([Message(f"{base}/event/{INVALID}", body, False)],
                    warning=f"notifyType {notify_type!r} cannot be a topic segment")
    if event is None:  # raw: its event topic only, and the iccid for the log line
        return Plan([event_topic], iccid=decoded.iccid, warning=decoded.problem)

    if isinstance(event, CheckHealth):
        # the time it was received is what it reports: newer than any before it
        now = iso(received_at)
        record, _ = merge(prior, {"last_health_check": now}, received_at.timestamp())
        health = Message(f"{base}/bridge/last_health_check", text(now), True)
        return Plan([health, event_topic], entity="bridge", record=record)

    if isinstance(event, OrderStatus):
        order_no, status = _id(event.content.order_no), event.content.order_status
        if order_no is None or status is None:
            return Plan([event_topic], warning="ORDER_STATUS without orderNo or orderStatus")
        if not SEGMENT.match(order_no):
            return Plan([Message(f"{base}/event/{INVALID}", body, False)],
                        warning=f"orderNo {order_no!r} cannot be a topic segment")
        record, applied = merge(prior, {"order_status": status}, at)
        messages = [event_topic]
        if applied:  # a stale ORDER_STATUS leaves the retained status alone
            messages.insert(0, Message(f"{base}/order/{order_no}/status", status.encode(), True))
        return Plan(messages, entity=f"order:{order_no}", record=record)

    iccid = event.content.iccid
    if iccid is None:
        return Plan([event_topic], warning=f"{notify_type} without an iccid")
    problem = iccid_problem(iccid)
    if problem is not None:
        return Plan([Message(f"{base}/event/{INVALID}", body, False)], warning=problem)

    fields = esim_fields(event)
    fields.update(iccid=iccid, last_event=notify_type, last_event_at=iso(moment))
    if decoded.notify_id is not None:
        fields["last_notify_id"] = decoded.notify_id
    record, applied = merge(prior, fields, at)
    if "data_remaining" in applied or "data_total" in applied:
        # from the state, not the event alone: a DATA_USAGE without totalVolume still
        # moves the percent, against the total known from before
        total, remain = record.fields.get("data_total"), record.fields.get("data_remaining")
        if isinstance(total, int) and total > 0 and isinstance(remain, int):
            record, more = merge(record, {"data_remaining_percent": percent(remain, total)}, at)
            applied += more
    prefix = f"{base}/{iccid}"
    messages = [
        Message(f"{prefix}/{VALUE_TOPICS[key]}", text(record.fields[key]), True)
        for key in VALUE_TOPICS
        if key in applied
    ]
    messages.append(Message(f"{prefix}/state", state_payload(record), True))
    messages.append(Message(f"{prefix}/event", body, False))
    messages.append(event_topic)
    return Plan(messages, entity=f"esim:{iccid}", record=record, iccid=iccid)


def entity_key(decoded: Decoded) -> str | None:
    """Which record an event reads and writes, so the store can load it first."""
    event = decoded.event
    if event is None or not SEGMENT.match(decoded.notify_type):
        return None
    if isinstance(event, CheckHealth):
        return "bridge"
    if isinstance(event, OrderStatus):
        order_no = _id(event.content.order_no)
        return f"order:{order_no}" if order_no and SEGMENT.match(order_no) else None
    iccid = event.content.iccid
    return f"esim:{iccid}" if iccid and iccid_problem(iccid) is None else None


def snapshot(entity: str, record: Record, base: str) -> list[Message]:
    """Every retained message an entity's record stands for, to republish on connect."""
    kind, _, name = entity.partition(":")
    if kind == "esim" and iccid_problem(name) is not None:
        return []  # stored by an older version, which did not refuse it
    if kind == "esim":
        prefix = f"{base}/{name}"
        out = [
            Message(f"{prefix}/{topic}", text(record.fields[key]), True)
            for key, topic in VALUE_TOPICS.items()
            if key in record.fields
        ]
        out.append(Message(f"{prefix}/state", state_payload(record), True))
        return out
    if kind == "order" and "order_status" in record.fields:
        status = text(record.fields["order_status"])
        return [Message(f"{base}/order/{name}/status", status, True)]
    if kind == "bridge" and "last_health_check" in record.fields:
        last = text(record.fields["last_health_check"])
        return [Message(f"{base}/bridge/last_health_check", last, True)]
    return []
