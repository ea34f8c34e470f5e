"""Property: no well-formed JSON body makes the bridge fail.

Hypothesis writes webhook bodies: known types with random, missing and
wrong-typed content, unknown and missing notifyTypes, huge and out-of-range
numbers, unicode, times at the edges of the calendar, iccids that cannot be
topic segments. Many go through decode, plan and the store in-process (fast);
fewer through a real bridge over HTTP, which must never answer 5xx and must
still be healthy at the end. Derandomized, without an example database, so CI
sees the same examples every run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.models import KNOWN_TYPES, BadWebhook, decode
from bridge.outbox import delete_outbox, runs
from bridge.sqlite import SCHEMA
from bridge.store import dedup_key
from bridge.topics import SEGMENT, Record, Topics, plan, route
from tests.brokers import Mosquitto
from tests.processes import BridgeProcess, survives
from tests.stores import Driver, Place, open_store, postgres_database

BASE = "esim"
FAST = settings(max_examples=1500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
STORED = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
OVER_HTTP = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow])


class Literal:
    """A JSON number json.dumps cannot write, such as 1e400."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def dump(value: Any, ascii_only: bool) -> str:
    """JSON text, with Literal numbers written as they are."""
    if isinstance(value, Literal):
        return value.text
    if isinstance(value, dict):
        items = (f"{dump(k, ascii_only)}:{dump(v, ascii_only)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


# -- strategies --------------------------------------------------------------------------------

EDGE_INTS = [0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1,
             2**64, 2**70, -(2**70), 10**40]
LITERALS = ["1e400", "-1e400", "1e-400", "123456789012345678901234567890", "-0", "1E+2", "0.0"]
EDGE_TIMES = [
    "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00Z", "2025-07-21T10:57:28Z", "2025-09-11T13:28:09+0000",
    "2025-09-11T13:28:09", "2025-02-30T00:00:00Z", "2025-07-21", "yesterday", "", "T",
]
SEGMENT_EDGES = ["", "a/b", "+", "#", "8" * 64, "8" * 65, "89 43", "\u0000", "\u00e4", "../x",
                 "89\n43", "$SYS", "INVALID"]

ints = st.one_of(st.integers(), st.sampled_from(EDGE_INTS))
numbers = st.one_of(
    ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(LITERALS).map(Literal),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12))
anything = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
offsets = st.timedeltas(min_value=-timedelta(hours=23, minutes=59),
                        max_value=timedelta(hours=23, minutes=59)).map(
    lambda delta: timezone(timedelta(minutes=delta // timedelta(minutes=1))))
moments = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59),
                       timezones=st.one_of(st.none(), st.just(UTC), offsets))
times = st.one_of(
    moments.map(lambda m: m.isoformat()),
    moments.map(lambda m: f"{m:%Y-%m-%dT%H:%M:%S}{m.strftime('%z') or 'Z'}"),
    st.sampled_from(EDGE_TIMES),
)
segments = st.one_of(
    st.from_regex(r"\A89[0-9]{16,18}\Z"),
    st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z"),
    st.text(max_size=70),
    st.sampled_from(SEGMENT_EDGES),
)
texts = st.one_of(st.text(max_size=30), st.sampled_from(["IN_USE", "ENABLED", "DAY", "Test"]))

VALUES = {
    "seg": segments,
    "str": texts,
    "int": st.one_of(ints, ints.map(str), st.sampled_from(LITERALS).map(Literal)),
    "float": numbers,
    "time": times,
}
ESIM = {"orderNo": "str", "transactionId": "str", "esimTranNo": "str", "iccid": "seg"}
FIELDS: dict[str, dict[str, str]] = {
    "CHECK_HEALTH": {"orderNo": "seg", "orderStatus": "str"},
    "ORDER_STATUS": {"orderNo": "seg", "orderStatus": "str"},
    "SMDP_EVENT": {**ESIM, "eid": "str", "esimStatus": "str", "smdpStatus": "str"},
    "ESIM_STATUS": {**ESIM, "esimStatus": "str", "smdpStatus": "str"},
    "DATA_USAGE": {**ESIM, "totalVolume": "int", "orderUsage": "int", "remain": "int",
                   "lastUpdateTime": "time", "remainThreshold": "float"},
    "VALIDITY_USAGE": {**ESIM, "durationUnit": "str", "totalDuration": "int",
                       "expiredTime": "time", "remain": "int"},
}
TOP = ("notifyType", "notifyId", "eventGenerateTime", "content")


# Values of the right type that a struct still takes: what reaches plan, the store and
# Home Assistant discovery (huge ints and times at the calendar's edge among them).
PLAUSIBLE = {
    "seg": st.one_of(st.from_regex(r"\A89[0-9]{16,18}\Z"), st.from_regex(r"\A89[0-9]{16,18}\Z"),
                     segments),
    "str": texts,
    "int": ints,
    "float": st.one_of(ints, st.floats(allow_nan=False, allow_infinity=False)),
    "time": st.one_of(times, st.sampled_from(EDGE_TIMES[:4])),
}


def contents(notify_type: str) -> st.SearchStrategy[Any]:
    """Every field optional: right-typed (most of the time), wrong-typed or anything; plus
    fields nobody documented."""
    plausible = {name: PLAUSIBLE[kind] for name, kind in FIELDS[notify_type].items()}
    mixed = {
        name: st.one_of(VALUES[kind], anything) for name, kind in FIELDS[notify_type].items()
    }
    extra = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in plausible), anything,
                            max_size=2)
    return st.one_of(
        st.fixed_dictionaries({}, optional=plausible),
        st.builds(lambda a, b: {**b, **a}, st.fixed_dictionaries({}, optional=plausible), extra),
        st.fixed_dictionaries({}, optional=mixed),
        anything,  # content that is no object at all, or an object of strangers
    )


@st.composite
def webhooks(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object: mostly a webhook of a known type, sometimes not quite one."""
    kind = draw(st.sampled_from([*KNOWN_TYPES, *KNOWN_TYPES, "unknown", "none", "wrong"]))
    body: dict[str, Any] = {}
    if kind in KNOWN_TYPES:
        body["notifyType"] = kind
        body["content"] = draw(contents(kind))
    elif kind == "unknown":
        body["notifyType"] = draw(st.one_of(segments, st.sampled_from(["CHECK", "NEW_TYPE"])))
        body["content"] = draw(anything)
    elif kind == "wrong":
        body["notifyType"] = draw(anything.filter(lambda v: not isinstance(v, str)))
    if draw(st.booleans()):
        body["notifyId"] = draw(st.one_of(st.uuids().map(lambda u: u.hex), texts, anything))
    if draw(st.booleans()):
        body["eventGenerateTime"] = draw(st.one_of(times, times, anything))
    extra = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in TOP), anything,
                                 max_size=2))
    body.update(extra)
    if draw(st.booleans()):  # key order must not matter
        body = dict(reversed(list(body.items())))
    return body


bodies = st.tuples(webhooks(), st.booleans()).map(
    lambda pair: (pair[0], dump(pair[0], ascii_only=pair[1]).encode())
)


def well_formed(body: dict[str, Any]) -> bool:
    """A webhook the contract says is taken (200): a JSON object with a string notifyType."""
    return isinstance(body.get("notifyType"), str)


# -- in-process: decode and plan, then the store -----------------------------------------------

NOW = datetime(2025, 9, 11, 13, 28, 9, tzinfo=UTC)


@FAST
@given(bodies)
def test_decode_and_plan_take_every_well_formed_body(case: tuple[dict[str, Any], bytes]) -> None:
    body, raw = case
    if not well_formed(body):
        with pytest.raises(BadWebhook):
            decode(raw)
        return
    decoded = decode(raw)
    assert decoded.notify_type == body["notifyType"]
    to = route(decoded)
    result = plan(to, decoded, raw, None, NOW, Topics(BASE))
    events = [m for m in result.messages if m.topic.startswith(f"{BASE}/event/")]
    assert len(events) == 1, result.messages  # every accepted webhook: one event topic,
    assert events[0].payload == raw and not events[0].retain  # carrying the body as received
    for message in result.messages:
        base, *levels = message.topic.split("/")
        assert base == BASE and all(SEGMENT.match(level) for level in levels), message.topic
    if result.record is not None:  # the store keeps records as msgpack
        record = msgspec.msgpack.decode(msgspec.msgpack.encode(result.record), type=Record)
        again = plan(to, decoded, raw, record, NOW + timedelta(seconds=1), Topics(BASE))
        assert len([m for m in again.messages if m.topic.startswith(f"{BASE}/event/")]) == 1


@FAST
@given(st.lists(st.integers(1, 60), max_size=60), st.lists(st.integers(1, 60), max_size=60))
def test_deleting_sent_messages_deletes_exactly_those(stored: list[int], sent: list[int]) -> None:
    """The publisher deletes acknowledged rows by ranges of ids: never a row in between
    that was not acknowledged (it would be lost), never fewer than were acknowledged."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(SCHEMA)
    conn.executemany("INSERT INTO outbox (id, topic, payload, retain) VALUES (?, 't', x'', 1)",
                     [(i,) for i in set(stored)])
    delete_outbox(conn, sent)
    left = {row[0] for row in conn.execute("SELECT id FROM outbox")}
    assert left == set(stored) - set(sent)


@FAST
@given(st.lists(st.integers(1, 300), max_size=300))
def test_acknowledged_ids_fold_into_the_fewest_ranges(ids: list[int]) -> None:
    """`runs` covers exactly the ids, in order, and never splits a run of consecutive ids
    (each range is a DELETE term; a split one only costs, a wrong one loses rows)."""
    ranges = runs(ids)
    covered = [i for first, last in ranges for i in range(first, last + 1)]
    assert covered == sorted(set(ids))
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(ranges))  # a gap between each


def test_deleting_many_scattered_messages_takes_several_statements() -> None:
    """More ranges than one DELETE takes (every other row acknowledged)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(SCHEMA)
    conn.executemany("INSERT INTO outbox (id, topic, payload, retain) VALUES (?, 't', x'', 1)",
                     [(i,) for i in range(1, 1001)])
    delete_outbox(conn, list(range(1, 1001, 2)))  # 500 ranges of one id each
    assert [row[0] for row in conn.execute("SELECT id FROM outbox")] == list(range(2, 1001, 2))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Driver]:
    """A real store with Home Assistant discovery on, so odd fields reach that code too;
    on each backend."""
    with contextlib.ExitStack() as stack:
        place: Place = tmp_path_factory.mktemp("properties") / "store.db"
        if request.param == "postgres":
            place = stack.enter_context(postgres_database())
        yield stack.enter_context(open_store(place, base=BASE, synchronous="normal"))


SEEN: dict[int, set[str]] = {}  # per store: the dedup keys it has taken


@STORED
@given(bodies)
def test_the_store_takes_every_well_formed_body(
    store: Driver, case: tuple[dict[str, Any], bytes]
) -> None:
    """Every well-formed body is taken once: its messages reach the outbox, among them its
    event topic with the body as received, and the retained ones the table of retained
    topics; a body seen before is a duplicate and adds nothing."""
    body, raw = case
    if not well_formed(body):
        return
    key = dedup_key(decode(raw), raw)
    before = store.outbox()[-1][0] if store.outbox() else 0
    accepted = store.ingest(raw)
    added = [message for _, message in store.outbox(before)]
    seen = SEEN.setdefault(id(store), set())
    assert accepted.duplicate == (key in seen)
    seen.add(key)
    if accepted.duplicate:
        assert added == []
        return
    assert len(added) == accepted.messages
    events = [m for m in added if m.topic.startswith(f"{BASE}/event/")]
    assert [(m.payload, m.retain) for m in events] == [(raw, False)]
    kept = store.retained()
    for message in added:
        if message.retain:  # the newest payload of each retained topic, or cleared
            newest = [m.payload for m in added if m.topic == message.topic][-1]
            assert kept.get(message.topic, b"") == newest


# -- over HTTP, against the real bridge --------------------------------------------------------


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeProcess]:
    workdir: Path = tmp_path_factory.mktemp("properties")
    broker = Mosquitto(workdir / "mosquitto").start()
    process = BridgeProcess(workdir / "bridge", broker.url)  # Home Assistant discovery on
    try:
        process.start()
        yield process
    finally:
        process.stop()
        broker.stop()


def test_the_bridge_never_answers_5xx_and_is_healthy_after_the_examples(
    bridge: BridgeProcess,
) -> None:
    @OVER_HTTP
    @given(bodies)
    def never_5xx(case: tuple[dict[str, Any], bytes]) -> None:
        body, raw = case
        answer = bridge.post(raw, method="POST")
        assert answer.status < 500, answer
        assert answer.status == (200 if well_formed(body) else 400), answer

    with survives(bridge):  # after the examples this test itself sent
        never_5xx()
