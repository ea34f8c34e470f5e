"""Home Assistant discovery over its lifecycle, on a real bridge and a real Mosquitto:
sent when an eSIM is first seen or its config changes, republished on Home
Assistant's birth message, removed when discovery is turned off."""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.publish as publish

from bridge.publisher import BIRTH_DELAY
from tests.brokers import Mosquitto
from tests.processes import BridgeProcess, Watcher, fixture, post_sentinel, retained

ICCID = "8943108170001029631"
ESIM_CONFIG = f"homeassistant/device/esim_{ICCID}/config"
BRIDGE_CONFIG = "homeassistant/device/esim_bridge/config"


def data_usage(notify_id: str, remain: int) -> bytes:
    body = json.loads(fixture("data_usage"))
    body["notifyId"] = notify_id
    body["content"]["remain"] = remain
    return json.dumps(body).encode()


def test_discovery_on_first_sight_and_only_on_change(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    bridge = BridgeProcess(tmp_path, mosquitto.url).start()
    try:
        with Watcher(mosquitto.port, ["homeassistant/#", "esim/#"]) as watcher:
            watcher.wait_for(BRIDGE_CONFIG)
            for n in range(3):
                assert bridge.post(data_usage(f"n{n}", 1000 - n)).status == 200
            watcher.wait_for(f"esim/{ICCID}/data_remaining", b"998")
            post_sentinel(bridge, watcher)
            configs = watcher.payloads(ESIM_CONFIG)
            assert len(configs) == 1, "discovery is sent once, not on every webhook"
            config = json.loads(configs[0])
            assert config["dev"]["identifiers"] == [f"esim_{ICCID}"]
            assert config["dev"]["serial_number"] == ICCID
            # discovery arrives before the values its entities read
            topics = [t for t, _, _ in watcher.messages]
            assert topics.index(ESIM_CONFIG) < topics.index(f"esim/{ICCID}/data_remaining")

            # a change of validity unit changes the config: sent again, once
            validity = json.loads(fixture("validity_usage"))
            # (still running: the fixture's eSIM expired in 2024, long enough ago for
            # Home Assistant to forget it, homeassistant.forget_ended_days)
            validity["content"].update(iccid=ICCID, durationUnit="HOUR",
                                       expiredTime="2099-01-01T00:00:00Z")
            assert bridge.post(json.dumps(validity).encode()).status == 200
            watcher.wait_count(ESIM_CONFIG, 2)
            post_sentinel(bridge, watcher)
            assert len(watcher.payloads(ESIM_CONFIG)) == 2
        broker_view = retained(mosquitto.port, "homeassistant/#")
        assert set(broker_view) == {ESIM_CONFIG, BRIDGE_CONFIG}
    finally:
        bridge.stop()


def test_birth_message_republishes_discovery_state_and_availability(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    bridge = BridgeProcess(tmp_path, mosquitto.url).start()
    try:
        assert bridge.post(fixture("data_usage")).status == 200
        assert bridge.post(fixture("smdp_event")).status == 200
        with Watcher(mosquitto.port, ["homeassistant/device/#", "esim/#"]) as watcher:
            watcher.wait_for(f"esim/{ICCID}/data_remaining")
            watcher.settle()
            watcher.messages.clear()
            publish.single("homeassistant/status", b"online", hostname="127.0.0.1",
                           port=mosquitto.port)
            watcher.wait_for(ESIM_CONFIG, timeout=10)
            watcher.wait_for("homeassistant/device/esim_8997250230000292199/config")
            watcher.wait_for(BRIDGE_CONFIG)
            watcher.wait_for("esim/bridge/state", b"online")
            watcher.wait_for(f"esim/{ICCID}/data_remaining", b"5351505742")
            watcher.wait_for("esim/8997250230000292199/status", b"GOT_RESOURCE")
            watcher.settle()
            # state only: event topics are not replayed
            assert not [t for t, _, _ in watcher.messages if t.endswith("/event")]
            # an "offline" birth topic does nothing
            watcher.messages.clear()
            publish.single("homeassistant/status", b"offline", hostname="127.0.0.1",
                           port=mosquitto.port)
            watcher.settle(quiet=3.0)
            assert not [t for t, _, _ in watcher.messages if t.startswith("homeassistant/dev")]
    finally:
        bridge.stop()


def test_birth_under_a_custom_prefix_republishes_after_a_delay_even_without_discovery(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Home Assistant with MQTT sensors of its own still wants the state after it starts;
    the random delay keeps a fleet of bridges from answering its birth all at once."""
    bridge = BridgeProcess(
        tmp_path, mosquitto.url, {"homeassistant": {"discovery": False, "prefix": "ha2"}}
    ).start()
    try:
        assert bridge.post(fixture("data_usage")).status == 200
        with Watcher(mosquitto.port, ["esim/#", "ha2/#"]) as watcher:
            watcher.wait_for(f"esim/{ICCID}/data_remaining")
            watcher.settle()
            watcher.messages.clear()
            publish.single("homeassistant/status", b"online", hostname="127.0.0.1",
                           port=mosquitto.port)  # not its prefix: nothing
            watcher.settle(quiet=3.0)
            assert watcher.messages == []
            sent = time.monotonic()
            publish.single("ha2/status", b"online", hostname="127.0.0.1", port=mosquitto.port)
            watcher.wait_for(f"esim/{ICCID}/data_remaining", b"5351505742", timeout=10)
            assert time.monotonic() - sent >= BIRTH_DELAY[0]
            watcher.wait_for("esim/bridge/state", b"online")
            watcher.settle()
            assert not [t for t, _, _ in watcher.messages if t.startswith("ha2/device")]
    finally:
        bridge.stop()


def test_turning_discovery_off_removes_what_was_published(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    bridge = BridgeProcess(tmp_path, mosquitto.url).start()
    try:
        assert bridge.post(fixture("data_usage")).status == 200
        with Watcher(mosquitto.port, ["homeassistant/#"]) as watcher:
            watcher.wait_for(ESIM_CONFIG)
    finally:
        bridge.stop()
    assert set(retained(mosquitto.port, "homeassistant/#")) == {ESIM_CONFIG, BRIDGE_CONFIG}

    off = BridgeProcess(tmp_path, mosquitto.url, {"homeassistant": {"discovery": False}})
    try:
        with Watcher(mosquitto.port, ["homeassistant/#"]) as watcher:
            off.start()
            watcher.wait_for(ESIM_CONFIG, b"")
            watcher.wait_for(BRIDGE_CONFIG, b"")
        assert retained(mosquitto.port, "homeassistant/#") == {}
        # and no new eSIM gets one while off
        assert off.post(fixture("smdp_event")).status == 200
        assert retained(mosquitto.port, "homeassistant/#") == {}
        # the per-eSIM state is still there
        assert f"esim/{ICCID}/data_remaining" in retained(mosquitto.port, "esim/#")
    finally:
        off.stop()


def test_custom_prefix_and_base_topic(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bridge = BridgeProcess(tmp_path, mosquitto.url, {
        "mqtt": {"base_topic": "home/esim"}, "homeassistant": {"prefix": "ha"},
    }).start()
    try:
        with Watcher(mosquitto.port, ["ha/#"]) as watcher:
            assert bridge.post(fixture("data_usage")).status == 200
            config = json.loads(watcher.wait_for(f"ha/device/esim_{ICCID}/config"))
        for component in config["cmps"].values():
            topics = [v for k, v in component.items() if k.endswith("topic")]
            assert all(str(t).startswith("home/esim/") for t in topics), component
    finally:
        bridge.stop()
