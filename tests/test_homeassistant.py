"""Unit tests of bridge.homeassistant: what Home Assistant is told about each eSIM.

The publisher republishes discovery only when the bytes change, so most tests
here pin determinism: equal inputs give equal bytes, volatile state never
changes them, and the things that should change them (validity unit, version)
do.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.homeassistant import (
    ESIM_CONFIG_FIELDS,
    ESIM_STATUSES,
    EVENT_TYPES,
    PROVIDER_STATES,
    SMDP_STATUSES,
    HomeAssistant,
    bridge_discovery,
    bridge_discovery_topic,
    esim_config_inputs,
    esim_discovery,
    esim_discovery_topic,
)
from bridge.models import KNOWN_TYPES
from bridge.topics import Entity, Record, Topics

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


# --- The provider's API (optional): its entities exist only when it is configured ------

# sha256 of bridge_discovery(base=BASE, prefix=PREFIX, version=VERSION) before the
# provider's entities existed: without a provider, not one byte may change (a changed
# config is republished to every user, and Home Assistant recreates nothing for it).
BRIDGE_BEFORE_PROVIDER = "31378a68f2ec3b5d4a10320f930584bff62223a9cafcff2b1b1506bde634036f"
BRIDGE_COMPONENTS = ["connectivity", "last_health_check", "webhooks_received", "outbox_backlog"]
PROVIDER_BRIDGE_COMPONENTS = ["balance", "provider", "last_sync"]
PROVIDER_ESIM_COMPONENTS = {"package": "sensor", "activated_at": "sensor", "refresh": "button"}


def bridge(*, provider: bool, base: str = BASE) -> tuple[str, bytes]:
    return bridge_discovery(base=base, prefix=PREFIX, version=VERSION, provider=provider)


def esim_with_provider(state: dict[str, object] | None = None) -> tuple[str, bytes]:
    full = FULL_STATE if state is None else state
    return esim_discovery(ICCID, full, base=BASE, prefix=PREFIX, version=VERSION, provider=True)


def test_without_a_provider_the_bridge_config_is_byte_for_byte_what_it_was() -> None:
    default = bridge_discovery(base=BASE, prefix=PREFIX, version=VERSION)
    assert bridge(provider=False) == default
    assert hashlib.sha256(default[1]).hexdigest() == BRIDGE_BEFORE_PROVIDER
    assert list(config(default[1])["cmps"]) == BRIDGE_COMPONENTS


def test_without_a_provider_an_esim_has_no_provider_entities() -> None:
    assert esim_discovery(
        ICCID, FULL_STATE, base=BASE, prefix=PREFIX, version=VERSION, provider=False
    ) == esim()
    assert not set(config(esim()[1])["cmps"]) & set(PROVIDER_ESIM_COMPONENTS)


def test_a_provider_adds_exactly_three_bridge_components_after_the_others() -> None:
    before = config(bridge(provider=False)[1])
    after = config(bridge(provider=True)[1])
    assert list(after["cmps"]) == BRIDGE_COMPONENTS + PROVIDER_BRIDGE_COMPONENTS
    assert {k: v for k, v in after["cmps"].items() if k in BRIDGE_COMPONENTS} == before["cmps"]
    assert (after["dev"], after["o"]) == (before["dev"], before["o"])
    assert bridge(provider=True)[0] == bridge(provider=False)[0]


def test_a_provider_adds_package_and_activated_to_each_esim() -> None:
    before = config(esim()[1])["cmps"]
    after = config(esim_with_provider()[1])["cmps"]
    assert {k: c["p"] for k, c in after.items()} == {
        **EXPECTED_COMPONENTS,
        **PROVIDER_ESIM_COMPONENTS,
    }
    assert {k: v for k, v in after.items() if k in before} == before
    assert after["package"]["unique_id"] == f"esim_{ICCID}_package"
    assert after["activated_at"]["unique_id"] == f"esim_{ICCID}_activated_at"
    refresh = after["refresh"]
    assert refresh["command_topic"] == f"{BASE}/{ICCID}/refresh" and refresh["retain"] is False


def test_provider_configs_are_deterministic() -> None:
    assert bridge(provider=True) == bridge(provider=True)
    assert esim_with_provider() == esim_with_provider()
    reordered = dict(reversed(list(FULL_STATE.items())))
    assert esim_with_provider(reordered) == esim_with_provider()


@given(st.dictionaries(st.sampled_from(sorted(FULL_STATE)) | st.text(max_size=8), json_values))
def test_with_a_provider_the_config_is_still_made_from_its_inputs_alone(
    state: dict[str, object],
) -> None:
    """Package and activation time are state the config must not read (they change)."""
    inputs_only = {name: state[name] for name in ESIM_CONFIG_FIELDS if name in state}
    assert esim_with_provider(state) == esim_with_provider(inputs_only)
    changed = {**FULL_STATE, "package": "Asia 1GB 7Days", "activated_at": "2025-01-01T00:00:00Z"}
    assert esim_with_provider(changed) == esim_with_provider()


def test_provider_esim_entities() -> None:
    cmps = config(esim_with_provider()[1])["cmps"]
    package, activated = cmps["package"], cmps["activated_at"]
    assert package["state_topic"] == f"{BASE}/{ICCID}/package"
    assert package["name"] == "Package"
    assert package["icon"].startswith("mdi:")
    assert not {"device_class", "state_class", "unit_of_measurement", "value_template"} & set(
        package
    )
    assert "entity_category" not in package
    assert activated["state_topic"] == f"{BASE}/{ICCID}/activated_at"
    assert activated["name"] == "Activated"
    assert activated["device_class"] == "timestamp"
    assert "entity_category" not in activated
    for comp in (package, activated):
        assert comp["availability_topic"] == f"{BASE}/bridge/state"


def test_provider_bridge_entities() -> None:
    cmps = config(bridge(provider=True, base="b1")[1])["cmps"]
    balance, provider, last_sync = (cmps[k] for k in PROVIDER_BRIDGE_COMPONENTS)
    assert [cmps[k]["unique_id"] for k in PROVIDER_BRIDGE_COMPONENTS] == [
        "esim_bridge_balance",
        "esim_bridge_provider",
        "esim_bridge_last_sync",
    ]
    topics = Topics("b1")
    assert balance["state_topic"] == topics.balance == "b1/bridge/balance"
    assert provider["state_topic"] == topics.provider == "b1/bridge/provider"
    assert last_sync["state_topic"] == topics.last_sync == "b1/bridge/last_sync"

    # Home Assistant rejects `measurement` on a monetary sensor.
    assert balance["device_class"] == "monetary"
    assert balance["unit_of_measurement"] == "USD"
    assert "state_class" not in balance
    assert "entity_category" not in balance

    assert provider["device_class"] == "enum"
    assert provider["options"] == list(PROVIDER_STATES) == [
        "ok", "unauthorized", "unreachable", "error"
    ]
    assert provider["value_template"].endswith("else 'None' }}")
    assert provider["entity_category"] == "diagnostic"

    assert last_sync["device_class"] == "timestamp"
    assert last_sync["entity_category"] == "diagnostic"
    for comp in (balance, provider, last_sync):
        assert comp["availability_topic"] == "b1/bridge/state"
        assert comp["icon"].startswith("mdi:")
        assert "expire_after" not in comp


def test_the_extension_passes_the_provider_setting_on() -> None:
    topics = Topics(BASE)
    record = Record({k: v for k, v in FULL_STATE.items() if isinstance(v, str | int | float)})
    default = HomeAssistant(topics, prefix=PREFIX, version=VERSION)
    without = HomeAssistant(topics, prefix=PREFIX, version=VERSION, provider=False)
    with_ = HomeAssistant(topics, prefix=PREFIX, version=VERSION, provider=True)
    assert default.bridge() == without.bridge()
    assert [(m.topic, m.payload, m.retain) for m in without.bridge()] == [
        (*bridge(provider=False), True)
    ]
    assert [(m.topic, m.payload, m.retain) for m in with_.bridge()] == [
        (*bridge(provider=True), True)
    ]
    entity = Entity("esim", ICCID)
    now = 0.0  # long before FULL_STATE expires: not forgotten
    assert [m.payload for m in default.entity(entity, record, now)] == [esim()[1]]
    assert [m.payload for m in with_.entity(entity, record, now)] == [esim_with_provider()[1]]
