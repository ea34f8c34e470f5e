"""End to end: every provider fixture over real HTTP gives exactly the contract's topics
on a real Mosquitto, from a real `esim-bridge serve` process."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.app import INFO_EVERY
from bridge.topics import RESERVED
from tests.brokers import Mosquitto
from tests.processes import BridgeProcess, Watcher, fixture, post_sentinel, retained

IGNORED = ("esim/bridge/info",)


@pytest.fixture
def bridge(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[BridgeProcess]:
    process = BridgeProcess(tmp_path / "bridge", mosquitto.url,
                            {"homeassistant": {"discovery": False}}).start()
    try:
        yield process
    finally:
        process.stop()


def _published(bridge: BridgeProcess, watcher: Watcher) -> list[tuple[str, bytes, bool]]:
    """All that `bridge` published since the watcher was cleared (a sentinel behind it
    has come), housekeeping aside."""
    end = post_sentinel(bridge, watcher)
    return [m for m in watcher.messages[:end]
            if not m[0].startswith(IGNORED) and m[0] != "esim/bridge/state"]


def test_data_usage_gives_exactly_the_contract_topics(
    bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    body = fixture("data_usage")
    with Watcher(mosquitto.port, ["esim/#"]) as watcher:
        watcher.settle()
        watcher.messages.clear()
        answer = bridge.post(body)
        assert (answer.status, answer.json()) == (200, {"ok": True})
        got = {topic: (payload, retain) for topic, payload, retain in _published(bridge, watcher)}
    iccid = "8943108170001029631"
    assert got == {
        f"esim/{iccid}/data_total": (b"53687091200", True),
        f"esim/{iccid}/data_used": (b"48335585458", True),
        f"esim/{iccid}/data_remaining": (b"5351505742", True),
        f"esim/{iccid}/data_remaining_percent": (b"10.0", True),
        f"esim/{iccid}/state": (got[f"esim/{iccid}/state"][0], True),
        f"esim/{iccid}/event": (body, False),
        "esim/event/DATA_USAGE": (body, False),
    }
    state = json.loads(got[f"esim/{iccid}/state"][0])
    assert state == {
        "iccid": iccid,
        "order_no": "B25052822150009",
        "esim_tran_no": "25052822150009",
        "transaction_id": "unique_id_from_partner",
        "data_total": 53687091200,
        "data_used": 48335585458,
        "data_remaining": 5351505742,
        "data_remaining_percent": 10.0,
        "remain_threshold": 0.1,
        "data_updated_at": "2025-07-21T09:38:25+00:00",
        "last_event": "DATA_USAGE",
        "last_event_at": "2025-07-21T10:57:28+00:00",
        "last_notify_id": "f776267e8d6745db8cc316e4c146ea0c",
    }


def test_bridge_info_reports_the_counts_then_keeps_quiet(
    bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    """bridge/info follows its counts, and nothing else: publishing it must not count as
    a change (it did, and an idle bridge put a new one in the store every 5 s)."""
    with Watcher(mosquitto.port, ["esim/bridge/info"]) as watcher:
        assert bridge.post(fixture("data_usage")).status == 200
        deadline = time.monotonic() + 3 * INFO_EVERY
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            infos = [json.loads(p) for p in watcher.payloads("esim/bridge/info")]
            info = infos[-1] if infos else {}
            if info and info["counts"]["published"] == 8:
                break
            time.sleep(0.1)
        assert set(info) == {"version", "started_at", "publisher", "counts"}
        assert info["counts"] == {
            "webhooks_received": 1,
            "duplicates": 0,
            "invalid": 0,
            "published": 8,  # `online`, and the webhook's seven; bridge/info not counted
            "outbox_backlog": 0,
            "esims": 1,
        }
        seen = len(watcher.payloads("esim/bridge/info"))
        time.sleep(INFO_EVERY + 1)  # a look at the counts, and time to publish what it found
        assert len(watcher.payloads("esim/bridge/info")) == seen, "info with no change"


EXPECTED: dict[str, dict[str, bytes | None]] = {
    # topic -> payload (None: checked elsewhere, must exist)
    "smdp_event": {
        "esim/8997250230000292199/status": b"GOT_RESOURCE",
        "esim/8997250230000292199/smdp_status": b"DOWNLOAD",
        "esim/8997250230000292199/eid": b"89049032007108882600137544319616",
        "esim/8997250230000292199/state": None,
    },
    "esim_status": {
        "esim/89852000263413436720/status": b"CANCEL",
        "esim/89852000263413436720/smdp_status": b"RELEASED",
        "esim/89852000263413436720/state": None,
    },
    "validity_usage": {
        "esim/894310817000000003/expires_at": b"2024-01-11T08:10:19+00:00",
        "esim/894310817000000003/validity_remaining": b"1",
        "esim/894310817000000003/state": None,
    },
    "order_status": {"esim/order/B23072016497499/status": b"GOT_RESOURCE"},
    "check_health": {"esim/bridge/last_health_check": None},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_fixture_gives_its_topics(
    name: str, bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    body = fixture(name)
    notify_type = json.loads(body)["notifyType"]
    with Watcher(mosquitto.port, ["esim/#"]) as watcher:
        watcher.settle()
        watcher.messages.clear()
        assert bridge.post(body).status == 200
        published = _published(bridge, watcher)
    retained_topics = {t: p for t, p, r in published if r}
    events = {t: p for t, p, r in published if not r}
    assert set(retained_topics) == set(EXPECTED[name])
    for topic, payload in EXPECTED[name].items():
        if payload is not None:
            assert retained_topics[topic] == payload, topic
    expected_events = {f"esim/event/{notify_type}": body}
    if name in ("smdp_event", "esim_status", "validity_usage"):
        iccid = json.loads(body)["content"]["iccid"]
        expected_events[f"esim/{iccid}/event"] = body
    assert events == expected_events


# The JSON state each fixture leaves, key for key (`last_event_at`: when the event carries
# no eventGenerateTime, the time it was received, checked for its form only).
EXPECTED_STATE: dict[str, dict[str, object]] = {
    "smdp_event": {
        "iccid": "8997250230000292199",
        "eid": "89049032007108882600137544319616",
        "order_no": "B25091113270004",
        "esim_tran_no": "25091113270004",
        "transaction_id": "12068951785848-1-1",
        "status": "GOT_RESOURCE",
        "smdp_status": "DOWNLOAD",
        "last_event": "SMDP_EVENT",
        "last_event_at": "2025-09-11T13:28:09+00:00",
        "last_notify_id": "5fcc219e32dc484598d3fd700cf3738d",
    },
    "esim_status": {
        "iccid": "89852000263413436720",
        "order_no": "B25080823490018",
        "esim_tran_no": "25080323490020",
        "transaction_id": "e23111e4d07746889c7bce41cf3f1b16",
        "status": "CANCEL",
        "smdp_status": "RELEASED",
        "last_event": "ESIM_STATUS",
        "last_event_at": "2025-08-09T00:23:45+00:00",
        "last_notify_id": "4038b3dfb1b050bf9f02501df67284f3",
    },
    "validity_usage": {
        "iccid": "894310817000000003",
        "order_no": "B23072016497499",
        "transaction_id": "Your_txn_id",
        "expires_at": "2024-01-11T08:10:19+00:00",
        "validity_remaining": 1,
        "validity_unit": "DAY",
        "validity_total": 30,
        "last_event": "VALIDITY_USAGE",
        "last_event_at": None,
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED_STATE))
def test_each_fixture_gives_its_state(
    name: str, bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    body = fixture(name)
    iccid = json.loads(body)["content"]["iccid"]
    with Watcher(mosquitto.port, [f"esim/{iccid}/state"]) as watcher:
        assert bridge.post(body).status == 200
        state = json.loads(watcher.wait_for(f"esim/{iccid}/state"))
    expected = dict(EXPECTED_STATE[name])
    if expected["last_event_at"] is None:
        received = datetime.fromisoformat(state["last_event_at"])
        assert received.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - received) < timedelta(minutes=1)
        expected["last_event_at"] = state["last_event_at"]
    assert state == expected


def test_health_check_time_is_iso_utc(bridge: BridgeProcess, mosquitto: Mosquitto) -> None:
    with Watcher(mosquitto.port, ["esim/bridge/last_health_check"]) as watcher:
        assert bridge.post(fixture("check_health")).status == 200
        stamp = watcher.wait_for("esim/bridge/last_health_check").decode()
    assert stamp.endswith("+00:00") and "T" in stamp


def test_duplicate_is_answered_and_published_once(
    bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    body = fixture("smdp_event")
    with Watcher(mosquitto.port, ["esim/event/#"]) as watcher:
        first = bridge.post(body)
        again = bridge.post(body)
        post_sentinel(bridge, watcher)
        assert first.json() == {"ok": True}
        assert again.json() == {"ok": True, "duplicate": True}
        assert len(watcher.payloads("esim/event/SMDP_EVENT")) == 1


def test_same_body_without_notify_id_is_a_duplicate(
    bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    body = fixture("validity_usage")  # no notifyId: the body's hash is the key
    assert bridge.post(body).json() == {"ok": True}
    assert bridge.post(body).json() == {"ok": True, "duplicate": True}
    changed = body.replace(b'"remain": 1', b'"remain": 2')
    assert bridge.post(changed).json() == {"ok": True}


def test_a_notify_id_is_forgotten_after_dedup_hours(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """store.dedup_hours bounds how long a notifyId is remembered (here 1.8 s)."""
    bridge = BridgeProcess(tmp_path, mosquitto.url, {"store": {"dedup_hours": 0.0005}}).start()
    try:
        body = fixture("smdp_event")
        with Watcher(mosquitto.port, ["esim/event/SMDP_EVENT"]) as watcher:
            assert bridge.post(body).json() == {"ok": True}
            assert bridge.post(body).json() == {"ok": True, "duplicate": True}
            time.sleep(2.5)
            assert bridge.post(body).json() == {"ok": True}
            assert len(watcher.wait_count("esim/event/SMDP_EVENT", 2)) == 2
    finally:
        bridge.stop()


def test_older_event_does_not_overwrite_newer_state(
    bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    iccid = "8997250230000292199"
    newer = json.loads(fixture("smdp_event"))
    newer["notifyId"] = "newer"
    newer["eventGenerateTime"] = "2025-09-11T14:00:00+0000"
    newer["content"].update(esimStatus="IN_USE", smdpStatus="ENABLED")
    with Watcher(mosquitto.port, ["esim/#"]) as watcher:
        assert bridge.post(json.dumps(newer).encode()).status == 200
        watcher.wait_for(f"esim/{iccid}/status", b"IN_USE")
        assert bridge.post(fixture("smdp_event")).status == 200  # 13:28, GOT_RESOURCE/DOWNLOAD
        post_sentinel(bridge, watcher)
        assert watcher.payloads(f"esim/{iccid}/status") == [b"IN_USE"]
        assert watcher.payloads(f"esim/{iccid}/smdp_status") == [b"ENABLED"]
        assert len(watcher.payloads(f"esim/{iccid}/event")) == 2  # stale events still flow
    state = json.loads(retained(mosquitto.port, f"esim/{iccid}/state")[f"esim/{iccid}/state"])
    assert state["status"] == "IN_USE"
    assert state["last_notify_id"] == "newer"


def test_unknown_type_and_misshapen_content_are_published_raw(
    bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    unknown = b'{"notifyType":"NEW_THING","content":{"iccid":"8943108170001029631"}}'
    misshapen = b'{"notifyType":"DATA_USAGE","content":{"iccid":"8943","totalVolume":"lots"}}'
    with Watcher(mosquitto.port, ["esim/#"]) as watcher:
        assert bridge.post(unknown).json() == {"ok": True}
        assert bridge.post(misshapen).json() == {"ok": True}
        watcher.wait_for("esim/event/NEW_THING", unknown)
        watcher.wait_for("esim/event/DATA_USAGE", misshapen)
        metrics = bridge.get("/metrics").body.decode()  # before the sentinel's warning
        post_sentinel(bridge, watcher)
        assert not [t for t, _, _ in watcher.messages if t.startswith("esim/8943")]
    assert "esim_bridge_warnings_total 2.0" in metrics


def test_an_event_stamped_far_ahead_is_a_warning_and_does_not_freeze_the_esim(
    bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    iccid = "8943108170000000300"
    stamped = {"notifyType": "ESIM_STATUS", "eventGenerateTime": "2099-01-01T00:00:00Z",
               "notifyId": "far-ahead", "content": {"iccid": iccid, "esimStatus": "IN_USE"}}
    later = {"notifyType": "ESIM_STATUS", "notifyId": "after-it",
             "content": {"iccid": iccid, "esimStatus": "USED_UP"}}
    with Watcher(mosquitto.port, [f"esim/{iccid}/status"]) as watcher:
        assert bridge.post(json.dumps(stamped).encode()).json() == {"ok": True}
        watcher.wait_for(f"esim/{iccid}/status", b"IN_USE")
        assert bridge.post(json.dumps(later).encode()).json() == {"ok": True}
        watcher.wait_for(f"esim/{iccid}/status", b"USED_UP")
    warned = [line for line in bridge.log().splitlines() if "more than an hour ahead" in line]
    assert warned and "WARNING" in warned[0] and "accepted" in warned[0]
    metrics = bridge.get("/metrics").body.decode()
    assert "esim_bridge_warnings_total 1.0" in metrics
    assert 'notify_type="ESIM_STATUS",outcome="accepted"} 2.0' in metrics


def test_numbers_as_strings_are_converted(bridge: BridgeProcess, mosquitto: Mosquitto) -> None:
    body = json.loads(fixture("data_usage"))
    body["notifyId"] = "as-strings"
    body["content"].update(totalVolume="53687091200", remain="5351505742", orderUsage="1")
    with Watcher(mosquitto.port, ["esim/+/data_remaining"]) as watcher:
        assert bridge.post(json.dumps(body).encode()).status == 200
        assert watcher.wait_for("esim/8943108170001029631/data_remaining") == b"5351505742"


@pytest.mark.parametrize(
    ("value", "segment"),
    [("iccid", "89#43"), ("iccid", "../x"), ("iccid", "8" * 65), ("notifyType", "A/B")],
)
def test_bad_topic_segment_goes_to_invalid(
    value: str, segment: str, bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    body = json.loads(fixture("esim_status"))
    body["notifyId"] = f"bad-{value}-{len(segment)}-{segment[:2]}"
    if value == "iccid":
        body["content"]["iccid"] = segment
    else:
        body["notifyType"] = segment
    raw = json.dumps(body).encode()
    with Watcher(mosquitto.port, ["esim/#"]) as watcher:
        watcher.settle()
        watcher.messages.clear()
        assert bridge.post(raw).json() == {"ok": True}
        published = _published(bridge, watcher)
    assert [(t, p) for t, p, _ in published] == [("esim/event/INVALID", raw)]
    warned = [line for line in bridge.log().splitlines() if "cannot be a topic segment" in line]
    assert warned and "WARNING" in warned[-1], bridge.log()[-2000:]


def test_an_iccid_naming_a_level_of_the_bridges_own_goes_to_invalid(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """`bridge`, `event` and `order` pass the segment pattern, but as an iccid they would
    write over `esim/bridge/state` (every entity's availability) and the bridge's device."""
    bridge = BridgeProcess(tmp_path, mosquitto.url).start()  # Home Assistant discovery on
    try:
        with Watcher(mosquitto.port, ["esim/#", "homeassistant/#"]) as watcher:
            watcher.wait_for("homeassistant/device/esim_bridge/config")
            watcher.settle()
            bridge_config = watcher.latest()["homeassistant/device/esim_bridge/config"]
            watcher.messages.clear()
            raws = []
            for level in sorted(RESERVED):
                body = json.loads(fixture("esim_status"))
                body["notifyId"] = f"reserved-{level}"
                body["content"]["iccid"] = level
                raws.append(json.dumps(body).encode())
                assert bridge.post(raws[-1]).json() == {"ok": True}
            end = post_sentinel(bridge, watcher)
            got = [(t, p) for t, p, _ in watcher.messages[:end] if t != "esim/bridge/info"]
        assert got == [("esim/event/INVALID", raw) for raw in raws]
        view = retained(mosquitto.port)
        assert view["esim/bridge/state"] == b"online"
        assert view["homeassistant/device/esim_bridge/config"] == bridge_config
    finally:
        bridge.stop()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (gzip.compress(b'{"notifyType": "DATA_USAGE"}'), "gzip-compressed"),
        (b"[1, 2]", "JSON object"),
        (b'{"content": {}}', "notifyType"),
        (b'{"notifyType": 7}', "notifyType"),
        (b'{"notifyType": "X", "c": "\xff"}', "UTF-8"),
        (b"[" * 5000 + b"]" * 5000, "JSON object"),
        (b'{"notifyType": "X", "notifyId": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
    ],
)
def test_bad_bodies_get_400_naming_the_problem(
    body: bytes, fragment: str, bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    with Watcher(mosquitto.port, ["esim/#"]) as watcher:
        watcher.settle()
        watcher.messages.clear()
        answer = bridge.post(body)
        assert answer.status == 400
        assert answer.json()["ok"] is False
        assert fragment in answer.json()["error"]
        end = post_sentinel(bridge, watcher)
        assert [t for t, _, _ in watcher.messages[:end] if t.startswith("esim/event")] == []


def test_health_ready_metrics_schema(bridge: BridgeProcess) -> None:
    assert bridge.get("/healthz").status == 200
    ready = bridge.get("/readyz")
    assert ready.status == 200 and ready.json()["ready"] is True
    bridge.post(fixture("data_usage"))
    answer = bridge.get("/metrics")
    # one charset parameter: Prometheus 3 refuses a media type with a parameter twice
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    metrics = answer.body.decode()
    assert 'esim_bridge_webhooks_total{notify_type="DATA_USAGE",outcome="accepted"} 1.0' in metrics
    families = {family.name for family in text_string_to_metric_families(metrics)}
    assert {"esim_bridge_webhooks", "esim_bridge_outbox_backlog"} <= families
    assert bridge.get("/schema").status == 200
    schema = bridge.get("/schema/openapi.json")
    assert schema.status == 200 and "/webhook" in schema.json()["paths"]


def test_a_senders_notify_type_cannot_forge_log_lines(
    bridge: BridgeProcess, mosquitto: Mosquitto
) -> None:
    body = json.dumps({"notifyType": "X\nFORGED esim-bridge: all good", "content": {}}).encode()
    assert bridge.post(body).json() == {"ok": True}
    assert bridge.post(fixture("check_health")).status == 200  # a line after it, flushed
    lines = bridge.log().splitlines()
    assert not [line for line in lines if line.startswith("FORGED")]
    assert any("'X\\nFORGED" in line for line in lines)
