"""This event, on top of this state, gives these MQTT messages: the pure heart.

No I/O here. For each webhook the store calls `route` once (which entity, or why
it is published raw or as INVALID), loads that entity's record, calls `plan`
inside its transaction and appends the messages to the outbox; the retained ones
also go to the table of retained topics. The publisher only sends them.

State is kept per *entity* (an eSIM, an order, the bridge) as a `Record`: the
contract's state fields plus, for each field, the time of the event that set
it. That time decides the out-of-order rule: a field (and so its value topic)
is only overwritten by an event at least as new as the one that set it.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

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
from bridge.outbox import Message

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


class Record(msgspec.Struct):
    """What is known about one entity, and when each field was last set."""

    fields: dict[str, Value] = msgspec.field(default_factory=dict)
    times: dict[str, float] = msgspec.field(default_factory=dict)


class Topics:
    """Every topic under `<base>`, spelled here and nowhere else."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.bridge_state = f"{base}/bridge/state"
        self.bridge_info = f"{base}/bridge/info"
        self.last_health_check = f"{base}/bridge/last_health_check"
        # the provider's API (optional): account balance, whether it answers, last sync
        self.balance = f"{base}/bridge/balance"
        self.provider = f"{base}/bridge/provider"
        self.last_sync = f"{base}/bridge/last_sync"
        self.invalid = f"{base}/event/{INVALID}"

    def event(self, notify_type: str) -> str:
        return f"{self.base}/event/{notify_type}"

    def esim(self, iccid: str, leaf: str) -> str:
        """`<base>/<iccid>/<leaf>`: leaf is a value topic, `state` or `event`."""
        return f"{self.base}/{iccid}/{leaf}"

    def order_status(self, order_no: str) -> str:
        return f"{self.base}/order/{order_no}/status"

    @property
    def refresh_commands(self) -> str:
        """`<base>/<iccid>/refresh` and `<base>/bridge/refresh`: read again now."""
        return f"{self.base}/+/refresh"

    def refreshed(self, topic: str) -> str | None:
        """What a refresh command names: an iccid, `bridge` (everything), or None when the
        topic is not one (or its iccid could not be an eSIM's)."""
        level = topic.removeprefix(f"{self.base}/").removesuffix("/refresh")
        if f"{self.base}/{level}/refresh" != topic:
            return None
        if level == BRIDGE.kind or iccid_problem(level) is None:
            return level
        return None

    def order_esims(self, order_no: str) -> str:
        """`<base>/order/<orderNo>/esims`: the JSON list of that order's iccids."""
        return f"{self.base}/order/{order_no}/esims"


class Entity(NamedTuple):
    """What a state record belongs to: an eSIM (by iccid), an order, or the bridge."""

    kind: str  # "esim", "order" or "bridge"
    name: str = ""

    @property
    def key(self) -> str:
        """Its key in the store: `esim:<iccid>`, `order:<orderNo>` or `bridge`."""
        return f"{self.kind}:{self.name}" if self.name else self.kind

    @classmethod
    def parse(cls, key: str) -> Entity:
        kind, _, name = key.partition(":")
        return cls(kind, name)


BRIDGE = Entity("bridge")


class Route(NamedTuple):
    """Where one webhook goes, decided once, before anything is loaded or written.

    `entity`: the record it changes, or None when it is published on its event topic
    only. `warning`: why it was published raw. `invalid`: a value that would be a topic
    segment is not one, so it goes to `<base>/event/INVALID` alone.
    """

    entity: Entity | None
    warning: str | None = None
    invalid: bool = False


class Plan(msgspec.Struct):
    """The outcome of one event: the entity's new record and the messages to send.

    `notice`: something odd about an event that was still understood (logged as a
    warning, and counted).
    """

    messages: list[Message]
    record: Record | None = None
    notice: str | None = None
    # the iccid now belongs to another eSIM: its record started afresh, and the store
    # clears the retained topics of the earlier one that this one has not set
    reused: bool = False


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
    "package": "package",
    "activated_at": "activated_at",
    # only with provider.publish_activation: whoever reads it can install the eSIM
    "qr_code_url": "qr_code_url",
}

STATE_KEYS = (
    "iccid", "eid", "order_no", "esim_tran_no", "transaction_id", "status", "smdp_status",
    "data_total", "data_used", "data_remaining", "data_remaining_percent", "remain_threshold",
    "data_updated_at", "expires_at", "validity_remaining", "validity_unit", "validity_total",
    "last_event", "last_event_at", "last_notify_id", "package", "activated_at",
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
    return record, _apply(record, fields, at)


def _apply(record: Record, fields: dict[str, Value], at: float) -> list[str]:
    """`merge`, into `record` itself: the keys it set."""
    applied: list[str] = []
    for key, value in fields.items():
        if record.times.get(key, float("-inf")) > at:
            continue
        record.fields[key] = value
        record.times[key] = at
        applied.append(key)
    return applied


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


def route(decoded: Decoded) -> Route:
    """Which entity a webhook changes, or why it changes none: the one place that looks
    at its identifiers and checks that they can be topic segments."""
    notify_type, event = decoded.notify_type, decoded.event
    if not SEGMENT.match(notify_type):
        return Route(None, f"notifyType {notify_type!r} cannot be a topic segment", True)
    if event is None:  # raw: its event topic only
        return Route(None, decoded.problem)
    if isinstance(event, CheckHealth):
        return Route(BRIDGE)
    if isinstance(event, OrderStatus):
        order_no = _id(event.content.order_no)
        if order_no is None or event.content.order_status is None:
            return Route(None, "ORDER_STATUS without orderNo or orderStatus")
        if not SEGMENT.match(order_no):
            return Route(None, f"orderNo {order_no!r} cannot be a topic segment", True)
        return Route(Entity("order", order_no))
    iccid = event.content.iccid
    if iccid is None:
        return Route(None, f"{notify_type} without an iccid")
    problem = iccid_problem(iccid)
    if problem is not None:
        return Route(None, problem, True)
    return Route(Entity("esim", iccid))


def plan(
    to: Route,
    decoded: Decoded,
    body: bytes,
    prior: Record | None,
    received_at: datetime,
    topics: Topics,
) -> Plan:
    """The messages one accepted webhook produces, given where `route` sent it and the
    prior record of that entity."""
    if to.invalid:
        return Plan([Message(topics.invalid, body, False)])
    event_topic = Message(topics.event(decoded.notify_type), body, False)
    if to.entity is None:
        return Plan([event_topic])
    moment, notice = event_moment(decoded, received_at)
    if to.entity.kind == "bridge":
        # the time it was received is what it reports: newer than any before it
        now = iso(received_at)
        record, applied = merge(prior, {"last_health_check": now}, received_at.timestamp())
        return Plan([*retained(BRIDGE, record, topics, applied), event_topic], record, notice)
    event = decoded.event
    if isinstance(event, OrderStatus):
        status = str(event.content.order_status)
        record, applied = merge(prior, {"order_status": status}, moment.timestamp())
        # a stale ORDER_STATUS leaves the retained status alone
        return Plan([*retained(to.entity, record, topics, applied), event_topic], record, notice)
    assert event is not None and not isinstance(event, CheckHealth)
    iccid = to.entity.name
    fields = esim_fields(event)
    fields.update(iccid=iccid, last_event=decoded.notify_type, last_event_at=iso(moment))
    if decoded.notify_id is not None:
        fields["last_notify_id"] = decoded.notify_id
    at = moment.timestamp()
    esim_event = Message(topics.esim(iccid, "event"), body, False)
    reuse = reused(prior, fields.get("esim_tran_no"), at)
    if reuse == "earlier":
        notice = (f"esimTranNo {fields['esim_tran_no']} is an earlier eSIM of iccid {iccid}: "
                  "its event is published, the state of the current one is left alone")
        return Plan([esim_event, event_topic], prior, notice)
    if reuse == "afresh":
        prior = None
    data = {key: fields.pop(key) for key in DATA_FIELDS if key in fields}
    record, applied = merge(prior, fields, at)
    updated = _timestamp(data.get("data_updated_at"))
    record, more = merge_data(record, data, at, updated)
    mark_ended(record, at)
    messages = retained(to.entity, record, topics, applied + more)
    messages += [esim_event, event_topic]
    return Plan(messages, record, notice, reused=reuse == "afresh")


# The data counters, and the time the provider last settled them (lastUpdateTime).
DATA_FIELDS = ("data_total", "data_used", "data_remaining", "data_updated_at")


def merge_data(
    record: Record, data: dict[str, Value], at: float, updated: float | None
) -> tuple[Record, list[str]]:  # `record` is a fresh one of `merge`: changed in place
    """Apply data counters (`updated`: their lastUpdateTime, if known), and the percent
    they give. Webhooks and the provider's API both report them, each with the
    provider's lastUpdateTime (hours behind, the operator's settlement): where both the
    record and the new counters have one, the newer lastUpdateTime wins, whatever the
    events' own times; where either lacks one, the out-of-order rule of `merge` holds."""
    held = _timestamp(record.fields.get("data_updated_at"))
    if held is not None and updated is not None:
        if updated < held:
            return record, []
        if updated > held:  # newer counters: they win over the times the old ones had
            at = max([at, *(record.times.get(key, at) for key in data)])
    if not data:
        return record, []
    applied = _apply(record, data, at)
    if "data_remaining" in applied or "data_total" in applied:
        # from the state, not the event alone: a DATA_USAGE without totalVolume still
        # moves the percent, against the total known from before
        total, remain = record.fields.get("data_total"), record.fields.get("data_remaining")
        if isinstance(total, int) and total > 0 and isinstance(remain, int):
            applied += _apply(record, {"data_remaining_percent": percent(remain, total)}, at)
    return record, applied


def _timestamp(value: Value | None) -> float | None:
    """A time the bridge stored as ISO text, as a POSIX timestamp."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def plan_order_esims(order_no: str, iccids: list[str], prior: Record | None, at: float,
                     topics: Topics) -> Plan:
    """`<base>/order/<orderNo>/esims` once the order's profiles were read (at `at`). The
    list is kept in the order's record (as JSON text), like every other retained topic:
    the resync at start republishes it rather than clearing it, and an order whose
    record holds it is no longer pending (`order_pending`)."""
    listed = msgspec.json.encode(sorted(iccids)).decode()
    record, applied = merge(prior, {"esims": listed}, at)
    return Plan(retained(Entity("order", order_no), record, topics, applied), record)


def order_pending(record: Record) -> bool:
    """Whether an order waits for its eSIMs to be read from the provider's API: its
    ORDER_STATUS said GOT_RESOURCE, and its `esims` are not known yet."""
    return record.fields.get("order_status") == "GOT_RESOURCE" and "esims" not in record.fields


class Reading(msgspec.Struct, frozen=True):
    """What the provider's API says of one eSIM now, as state fields.

    A profile sets `fields` (status, package, expiry...) and `data` only where no
    counters are known yet (its orderUsage lags); a usage reading sets `data`, with its
    lastUpdateTime as `updated`, under the same rule as a DATA_USAGE webhook."""

    iccid: str
    esim_tran_no: str | None
    fields: dict[str, Value]
    data: dict[str, Value]
    updated: float | None = None


def plan_reading(reading: Reading, prior: Record | None, at: float, topics: Topics) -> Plan:
    """The retained messages a reading of the provider's API gives (no event topics: it is
    not an event). Read at `at`, so it is newer than every event before it: a profile of
    another eSIM (another esimTranNo) starts the iccid afresh; a usage reading of another
    eSIM than the one held changes nothing."""
    entity = Entity("esim", reading.iccid)
    reuse = reused(prior, reading.esim_tran_no, at)
    if reuse != "same" and not reading.fields:  # usage of an eSIM no longer on this iccid
        return Plan([], prior)
    if reuse == "earlier":
        return Plan([], prior)
    if reuse == "afresh":
        prior = None
    fields = dict(reading.fields, iccid=reading.iccid)
    if reading.esim_tran_no is not None:
        fields["esim_tran_no"] = reading.esim_tran_no
    record, applied = merge(prior, fields, at)
    data = reading.data
    if reading.updated is None:  # a profile's counters: only where none are known yet
        data = {key: value for key, value in data.items() if key not in record.fields}
    record, more = merge_data(record, data, at, reading.updated)
    mark_ended(record, at)
    return Plan(retained(entity, record, topics, applied + more), record,
                reused=reuse == "afresh")


# An eSIM with one of these statuses has ended (the API spells REVOKED as REVOKE).
ENDED_STATUSES = frozenset({"CANCEL", "REVOKED", "REVOKE"})


def mark_ended(record: Record, at: float) -> None:
    """Note when an eSIM was first seen cancelled or revoked (`ended_at`, kept in the
    record, not a state key): the days to forget it are counted from then."""
    ended = record.fields.get("status") in ENDED_STATUSES
    if ended and "ended_at" not in record.fields:
        record.fields["ended_at"] = at
        record.times["ended_at"] = at
    elif not ended and "ended_at" in record.fields:
        del record.fields["ended_at"]
        del record.times["ended_at"]


def ended_since(record: Record) -> float | None:
    """Since when an eSIM has ended, as a timestamp: past its expiry (counted from it), or
    cancelled or revoked (counted from when that was first seen); None while it has not.
    An expiry still ahead is not an end yet: `forgotten` compares with now."""
    moments = [_timestamp(record.fields.get("expires_at"))]
    ended_at = record.fields.get("ended_at")
    if isinstance(ended_at, float | int):
        moments.append(float(ended_at))
    known = [moment for moment in moments if moment is not None]
    return min(known) if known else None


def reused(prior: Record | None, esim_tran_no: Value | None, at: float) -> str:
    """Whether an eSIM event belongs to the eSIM its iccid's record is about. The provider
    gives a used ICCID to a new eSIM (another esimTranNo) later: "same" when it is the
    same eSIM (or either side does not say), "afresh" when it is another eSIM at least as
    new as everything the record holds (the record starts over, so nothing of the earlier
    eSIM carries over), "earlier" when it is another eSIM older than the record (a late
    event of the eSIM before: it must not bring that one's fields back)."""
    held = prior.fields.get("esim_tran_no") if prior is not None else None
    if prior is None or held is None or esim_tran_no is None or held == esim_tran_no:
        return "same"
    return "afresh" if at >= max(prior.times.values(), default=at) else "earlier"


def retained(
    entity: Entity, record: Record, topics: Topics, fields: Collection[str] | None = None
) -> list[Message]:
    """The retained messages an entity's record stands for: those of `fields` (the ones
    an event just set), or all of them. An eSIM's JSON state is always among them. The
    event path and the store's upgrade of an older database both build them here."""
    held = record.fields
    wanted = held.keys() if fields is None else set(fields)

    if entity.kind == "esim":
        out = [
            Message(topics.esim(entity.name, leaf), text(held[key]), True)
            for key, leaf in VALUE_TOPICS.items()
            if key in wanted
        ]
        out.append(Message(topics.esim(entity.name, "state"), state_payload(record), True))
        return out
    if entity.kind == "order":
        spelled = {"order_status": topics.order_status, "esims": topics.order_esims}
        return [Message(spell(entity.name), text(held[key]), True)
                for key, spell in spelled.items() if key in wanted]
    if entity.kind == "bridge" and "last_health_check" in wanted:
        last = text(record.fields["last_health_check"])
        return [Message(topics.last_health_check, last, True)]
    return []
