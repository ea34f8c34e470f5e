"""Unit tests of bridge.homeassistant: what Home Assistant is told about each eSIM.

The publisher republishes discovery only when the bytes change, so most tests
here pin determinism: equal inputs give equal bytes, volatile state never
changes them, and the things that should change them (validity unit, version)
do.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.homeassistant import (
    ESIM_CONFIG_FIELDS,
    ESIM_STATUSES,
    EVENT_TYPES,
    SMDP_STATUSES,
    bridge_discovery,
    bridge_discovery_topic,
    esim_config_inputs,
    esim_discovery,
    esim_discovery_topic,
)
from bridge.models import KNOWN_TYPES

ICCID = "8943108170001029631"
BASE = "esim"
PREFIX = "homeassistant"
VERSION = "0.1.0"

FULL_STATE: dict[str, object] = {
    "iccid": ICCID,
    "eid": "89049032007108882600137544319616",
    "order_no": "B25052822150009",
    "esim_tran_no": "25052822150009",
    "transaction_id": "unique_id_from_partner",
    "status": "IN_USE",
    "smdp_status": "ENABLED",
    "data_total": 53687091200,
    "data_used": 48335585458,
    "data_remaining": 5351505742,
    "data_remaining_percent": 10.0,
    "remain_threshold": 0.1,
    "data_updated_at": "2025-07-21T09:38:25+00:00",
    "expires_at": "2024-01-11T08:10:19+00:00",
    "validity_remaining": 1,
    "validity_unit": "DAY",
    "validity_total": 30,
    "last_event": "DATA_USAGE",
    "last_event_at": "2025-07-21T10:57:28+00:00",
    "last_notify_id": "f776267e8d6745db8cc316e4c146ea0c",
}
# Everything that changes with events but must not change the config.
VOLATILE_KEYS = sorted(set(FULL_STATE) - {"iccid", "validity_unit"})

EXPECTED_COMPONENTS = {
    "status": "sensor",
    "smdp_status": "sensor",
    "data_remaining": "sensor",
    "data_used": "sensor",
    "data_total": "sensor",
    "data_remaining_percent": "sensor",
    "expires_at": "sensor",
    "validity_remaining": "sensor",
    "last_event": "event",
    "eid": "sensor",
    "order_no": "sensor",
}

iccids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
json_values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)


def esim(
    state: dict[str, object] | None = None, *, base: str = BASE, version: str = VERSION
) -> tuple[str, bytes]:
    """Discovery of the test eSIM, by default in its full state."""
    full = FULL_STATE if state is None else state
    return esim_discovery(ICCID, full, base=base, prefix=PREFIX, version=version)


def config(payload: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(payload)
    return decoded


def test_esim_topic_uses_prefix_and_object_id() -> None:
    topic, _ = esim_discovery(ICCID, {}, base=BASE, prefix="ha/disc", version=VERSION)
    assert topic == f"ha/disc/device/esim_{ICCID}/config"
    assert topic == esim_discovery_topic(ICCID, prefix="ha/disc")


def test_bridge_topic_uses_prefix() -> None:
    topic, _ = bridge_discovery(base=BASE, prefix="ha2", version=VERSION)
    assert topic == "ha2/device/esim_bridge/config" == bridge_discovery_topic(prefix="ha2")


def test_esim_components_and_unique_ids_are_stable() -> None:
    cmps = config(esim()[1])["cmps"]
    assert {key: c["p"] for key, c in cmps.items()} == EXPECTED_COMPONENTS
    assert {c["unique_id"] for c in cmps.values()} == {f"esim_{ICCID}_{key}" for key in cmps}


@given(iccids, st.text(min_size=1, max_size=10), st.text(min_size=1, max_size=10))
def test_unique_ids_do_not_depend_on_topics_or_version(iccid: str, base: str, version: str) -> None:
    """A unique_id that moved would orphan the user's entity and its history."""
    a = config(esim_discovery(iccid, {}, base=BASE, prefix=PREFIX, version=VERSION)[1])
    b = config(esim_discovery(iccid, {}, base=base, prefix="x", version=version)[1])
    assert [c["unique_id"] for c in a["cmps"].values()] == [
        c["unique_id"] for c in b["cmps"].values()
    ]
    assert a["dev"]["identifiers"] == b["dev"]["identifiers"] == [f"esim_{iccid}"]


def test_same_inputs_give_same_bytes() -> None:
    assert esim() == esim()
    reordered = dict(reversed(list(FULL_STATE.items())))
    assert esim(reordered) == esim()
    assert bridge_discovery(base=BASE, prefix=PREFIX, version=VERSION) == bridge_discovery(
        base=BASE, prefix=PREFIX, version=VERSION
    )


@given(st.dictionaries(st.sampled_from(VOLATILE_KEYS), json_values))
def test_volatile_state_never_changes_the_config(changes: dict[str, object]) -> None:
    """Data counters, timestamps and the last event must not trigger a republish."""
    assert esim({**FULL_STATE, **changes}) == esim()


@given(st.dictionaries(st.sampled_from(sorted(FULL_STATE)) | st.text(max_size=8), json_values))
def test_the_config_is_made_from_its_inputs_alone(state: dict[str, object]) -> None:
    """The store skips discovery for an event that leaves `esim_config_inputs` as it was;
    that is only right while the config reads nothing else of the state."""
    inputs_only = {name: state[name] for name in ESIM_CONFIG_FIELDS if name in state}
    assert esim(state) == esim(inputs_only)
    assert esim_config_inputs(state) == esim_config_inputs(inputs_only)


def test_empty_state_equals_a_full_day_state() -> None:
    """The provider sends DAY, so an eSIM first seen without validity needs no second config."""
    assert esim({}) == esim()


@pytest.mark.parametrize(
    ("unit", "device_class", "ha_unit"),
    [
        ("DAY", "duration", "d"),
        ("day", "duration", "d"),
        ("HOUR", "duration", "h"),
        ("MINUTE", "duration", "min"),
        ("SECOND", "duration", "s"),
        ("MONTH", None, "month"),
        (None, "duration", "d"),
        ("", "duration", "d"),
        (30, "duration", "d"),
    ],
)
def test_validity_unit_follows_state(unit: object, device_class: str | None, ha_unit: str) -> None:
    validity = config(esim({"validity_unit": unit})[1])["cmps"]["validity_remaining"]
    assert validity.get("device_class") == device_class
    assert validity["unit_of_measurement"] == ha_unit


def test_config_changes_when_validity_unit_changes() -> None:
    assert esim({**FULL_STATE, "validity_unit": "HOUR"}) != esim()


def test_config_changes_with_version() -> None:
    """The origin carries the version, so an upgrade republishes discovery once."""
    assert esim(version="0.2.0") != esim()
    assert config(esim(version="0.2.0")[1])["o"]["sw_version"] == "0.2.0"


def test_payload_is_compact_json() -> None:
    for payload in (esim()[1], bridge_discovery(base=BASE, prefix=PREFIX, version=VERSION)[1]):
        assert payload == msgspec.json.encode(msgspec.json.decode(payload))
        assert b"\n" not in payload


def test_esim_device_block() -> None:
    dev = config(esim()[1])["dev"]
    assert dev["identifiers"] == [f"esim_{ICCID}"]
    assert dev["serial_number"] == ICCID
    assert dev["manufacturer"] == "eSIM Access"
    assert dev["name"] == "eSIM …9631"
    assert dev["via_device"] == "esim_bridge"


def test_origin_block() -> None:
    for payload in (esim()[1], bridge_discovery(base=BASE, prefix=PREFIX, version=VERSION)[1]):
        origin = config(payload)["o"]
        assert origin["name"] == "esim-bridge"
        assert origin["sw_version"] == VERSION
        assert origin["support_url"].startswith("https://")


def test_every_esim_component_is_available_only_with_the_bridge() -> None:
    for key, comp in config(esim(base="b1")[1])["cmps"].items():
        assert comp["availability_topic"] == "b1/bridge/state", key
        assert (comp["payload_available"], comp["payload_not_available"]) == ("online", "offline")


def test_esim_components_read_only_their_own_topics() -> None:
    for key, comp in config(esim(base="b1")[1])["cmps"].items():
        assert comp["state_topic"].startswith(f"b1/{ICCID}/"), key


def test_esim_components_read_the_contract_topics() -> None:
    topics = {k: c["state_topic"] for k, c in config(esim()[1])["cmps"].items()}
    root = f"{BASE}/{ICCID}"
    assert topics == {
        "status": f"{root}/status",
        "smdp_status": f"{root}/smdp_status",
        "data_remaining": f"{root}/data_remaining",
        "data_used": f"{root}/data_used",
        "data_total": f"{root}/data_total",
        "data_remaining_percent": f"{root}/data_remaining_percent",
        "expires_at": f"{root}/expires_at",
        "validity_remaining": f"{root}/validity_remaining",
        "last_event": f"{root}/event",
        "eid": f"{root}/eid",
        "order_no": f"{root}/state",
    }


def test_data_sizes_are_bytes() -> None:
    cmps = config(esim()[1])["cmps"]
    for key in ("data_remaining", "data_used", "data_total"):
        assert cmps[key]["device_class"] == "data_size"
        assert cmps[key]["unit_of_measurement"] == "B"
        assert cmps[key]["state_class"] == "measurement"


def test_enum_sensors_list_every_documented_value_and_map_the_rest_to_none() -> None:
    cmps = config(esim()[1])["cmps"]
    for key, values in (("status", ESIM_STATUSES), ("smdp_status", SMDP_STATUSES)):
        assert cmps[key]["device_class"] == "enum"
        assert cmps[key]["options"] == list(values)
        template = cmps[key]["value_template"]
        assert all(f"'{v}'" in template for v in values)
        assert template.endswith("else 'None' }}")


# esimStatus values of the provider API (PROVIDER-API.md); webhooks spell REVOKE REVOKED.
API_ESIM_STATUSES = (
    "CREATE", "PAYING", "PAID", "GETTING_RESOURCE", "GOT_RESOURCE", "IN_USE", "USED_UP",
    "UNUSED_EXPIRED", "USED_EXPIRED", "CANCEL", "SUSPENDED", "REVOKE",
)


def test_every_esim_status_of_the_api_and_the_webhooks_is_known() -> None:
    """A profile read by sync must show its status, not unknown; both spellings of revoked."""
    assert set(API_ESIM_STATUSES) | {"REVOKED"} == set(ESIM_STATUSES)
    assert len(ESIM_STATUSES) == len(set(ESIM_STATUSES))
    life = ESIM_STATUSES.index
    assert life("CREATE") < life("GOT_RESOURCE") < life("IN_USE") < life("CANCEL")
    assert life("REVOKE") + 1 == life("REVOKED")


def test_event_types_are_notify_types_and_smdp_statuses() -> None:
    event = config(esim()[1])["cmps"]["last_event"]
    assert event["event_types"] == list(EVENT_TYPES)
    assert set(event["event_types"]) == set(KNOWN_TYPES) | set(SMDP_STATUSES)
    assert "event_type=t" in event["value_template"]


def test_ids_are_diagnostic() -> None:
    cmps = config(esim()[1])["cmps"]
    diagnostic = {k for k, c in cmps.items() if c.get("entity_category") == "diagnostic"}
    assert diagnostic == {"eid", "order_no", "smdp_status"}


def test_names_are_entity_names_not_device_names() -> None:
    """has_entity_name style: Home Assistant prefixes the device name itself."""
    for comp in config(esim()[1])["cmps"].values():
        assert comp["name"] and "eSIM" not in comp["name"] and ICCID not in comp["name"]
        assert comp["icon"].startswith("mdi:")


def test_no_expire_after_anywhere() -> None:
    """Webhooks can be days apart; an expiring entity would go unavailable between them."""
    for payload in (esim()[1], bridge_discovery(base=BASE, prefix=PREFIX, version=VERSION)[1]):
        assert b"expire_after" not in payload
        assert b"exp_aft" not in payload


def test_bridge_components() -> None:
    cfg = config(bridge_discovery(base="b1", prefix=PREFIX, version=VERSION)[1])
    cmps = cfg["cmps"]
    assert {k: c["unique_id"] for k, c in cmps.items()} == {
        "connectivity": "esim_bridge_connectivity",
        "last_health_check": "esim_bridge_last_health_check",
        "webhooks_received": "esim_bridge_webhooks_received",
        "outbox_backlog": "esim_bridge_outbox_backlog",
    }
    assert cfg["dev"]["identifiers"] == ["esim_bridge"]
    assert cfg["dev"]["sw_version"] == VERSION
    for comp in cmps.values():
        assert comp["state_topic"].startswith("b1/bridge/")
    assert cmps["webhooks_received"]["state_class"] == "total_increasing"
    assert cmps["outbox_backlog"]["state_class"] == "measurement"
    assert cmps["last_health_check"]["device_class"] == "timestamp"


def test_connectivity_shows_offline_instead_of_going_unavailable() -> None:
    """It reads bridge/state itself; availability on that topic would hide "offline"."""
    cmps = config(bridge_discovery(base="b1", prefix=PREFIX, version=VERSION)[1])["cmps"]
    conn = cmps.pop("connectivity")
    assert conn["p"] == "binary_sensor"
    assert conn["device_class"] == "connectivity"
    assert conn["state_topic"] == "b1/bridge/state"
    assert (conn["payload_on"], conn["payload_off"]) == ("online", "offline")
    assert not {k for k in conn if k.startswith(("availability", "avty"))}
    for comp in cmps.values():
        assert comp["availability_topic"] == "b1/bridge/state"
