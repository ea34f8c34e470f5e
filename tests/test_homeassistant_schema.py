"""Every discovery payload, checked against the rules Home Assistant applies to it.

Home Assistant is too big to install for a test, so its rules are restated here
as data, each next to the source it comes from (home-assistant/core, paths
relative to ``homeassistant/``):

- ``components/mqtt/discovery.py``: ``TOPIC_MATCHER`` (the discovery topic),
  ``_replace_all_abbreviations`` (abbreviations are expanded at the top level,
  in ``o``, in ``dev`` and in each component and its availability list),
  ``_parse_device_payload`` (the device payload is validated as a whole and
  dropped entirely if invalid), ``_merge_common_device_options`` (shared
  options at the top level are inherited by components that lack them).
- ``components/mqtt/abbreviations.py``: ``ABBREVIATIONS``,
  ``DEVICE_ABBREVIATIONS``, ``ORIGIN_ABBREVIATIONS``; ``p``, ``o`` and ``cmps``
  arrived with device-based discovery (2024.11).
- ``components/mqtt/schemas.py``: ``DEVICE_DISCOVERY_SCHEMA`` (top-level keys;
  ``dev``, ``o`` and ``cmps`` required), ``COMPONENT_CONFIG_SCHEMA`` (``platform``
  required and supported), ``SHARED_OPTIONS``, ``MQTT_ENTITY_DEVICE_INFO_SCHEMA``
  (at least one identifier or connection), ``MQTT_ORIGIN_INFO_SCHEMA`` (``name``
  required), ``MQTT_AVAILABILITY_SCHEMA`` (``availability`` and
  ``availability_topic`` are exclusive), ``MQTT_ENTITY_COMMON_SCHEMA``.
- ``components/mqtt/config.py``: ``MQTT_BASE_SCHEMA``, ``MQTT_RO_SCHEMA``
  (``state_topic`` required).
- ``components/mqtt/sensor.py``: ``_PLATFORM_SCHEMA_BASE`` and
  ``validate_sensor_state_and_device_class_config`` (``options`` only, and
  never empty, with device class ``enum``, never with ``state_class`` or
  ``unit_of_measurement``; ``last_reset_value_template`` only with ``total``);
  ``_update_state`` (a rendered ``"None"``, ``PAYLOAD_NONE`` in
  ``mqtt/const.py``, makes the state unknown).
- ``components/mqtt/binary_sensor.py`` and ``components/mqtt/event.py``
  (``event_types`` required; the payload after the template must be a JSON
  object with ``event_type``, one of ``event_types``).
- ``components/sensor/const.py``: ``SensorDeviceClass``,
  ``NON_NUMERIC_DEVICE_CLASSES``, ``DEVICE_CLASS_UNITS``,
  ``DEVICE_CLASS_STATE_CLASSES``; ``components/sensor/__init__.py``
  ``SensorEntity.state`` (raises for a unit on a non-numeric device class, an
  enum value outside ``options``, a timestamp without timezone, a non-numeric
  value where a number is expected).
- ``const.py`` (``UnitOfInformation``, ``UnitOfTime``, ``EntityCategory``),
  ``components/binary_sensor/__init__.py`` and ``components/event/__init__.py``
  (device classes), ``helpers/config_validation.py`` (``icon``,
  ``positive_int``, ``configuration_url``), ``components/mqtt/util.py``
  (``valid_subscribe_topic``).
- Documentation: https://www.home-assistant.io/integrations/mqtt/ (device
  discovery, abbreviations) and https://www.home-assistant.io/integrations/sensor.mqtt/.

A discovery schema drops unknown keys silently (``extra=vol.REMOVE_EXTRA``), so
an unknown key here is a failure: it would be a setting that does nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

import msgspec
import pytest

from bridge.homeassistant import SMDP_STATUSES, bridge_discovery, esim_discovery

# --- Rules, as data ----------------------------------------------------------

# mqtt/discovery.py TOPIC_MATCHER, applied to the topic after "<prefix>/".
TOPIC_MATCHER = re.compile(
    r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config"
)

# mqtt/abbreviations.py (excerpt: every abbreviation of an option the platforms
# below accept). An abbreviation missing here shows up as an unknown key.
ABBREVIATIONS = {
    "avty": "availability",
    "avty_mode": "availability_mode",
    "avty_t": "availability_topic",
    "avty_tpl": "availability_template",
    "cmd_t": "command_topic",
    "cmps": "components",
    "def_ent_id": "default_entity_id",
    "dev": "device",
    "dev_cla": "device_class",
    "e": "encoding",
    "en": "enabled_by_default",
    "ent_cat": "entity_category",
    "ent_pic": "entity_picture",
    "evt_typ": "event_types",
    "exp_aft": "expire_after",
    "frc_upd": "force_update",
    "ic": "icon",
    "json_attr_t": "json_attributes_topic",
    "json_attr_tpl": "json_attributes_template",
    "lrst_val_tpl": "last_reset_value_template",
    "name": "name",
    "o": "origin",
    "obj_id": "object_id",
    "off_dly": "off_delay",
    "ops": "options",
    "p": "platform",
    "pl_avail": "payload_available",
    "pl_not_avail": "payload_not_available",
    "pl_off": "payload_off",
    "pl_on": "payload_on",
    "stat_cla": "state_class",
    "stat_t": "state_topic",
    "sug_dsp_prc": "suggested_display_precision",
    "t": "topic",
    "uniq_id": "unique_id",
    "unit_of_meas": "unit_of_measurement",
    "val_tpl": "value_template",
}
DEVICE_ABBREVIATIONS = {
    "cns": "connections",
    "cu": "configuration_url",
    "hw": "hw_version",
    "ids": "identifiers",
    "mdl": "model",
    "mdl_id": "model_id",
    "mf": "manufacturer",
    "name": "name",
    "sa": "suggested_area",
    "sn": "serial_number",
    "sw": "sw_version",
}
ORIGIN_ABBREVIATIONS = {"name": "name", "sw": "sw_version", "url": "support_url"}

# mqtt/schemas.py
AVAILABILITY_KEYS = {
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "payload_available",
    "payload_not_available",
}
SHARED_OPTIONS = AVAILABILITY_KEYS | {"command_topic", "state_topic"}
DEVICE_DISCOVERY_KEYS = AVAILABILITY_KEYS | {
    "device",
    "components",
    "origin",
    "state_topic",
    "command_topic",
    "qos",
    "encoding",
}
DEVICE_DISCOVERY_REQUIRED = {"device", "components", "origin"}
DEVICE_INFO_KEYS = {
    "identifiers",
    "connections",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "hw_version",
    "serial_number",
    "sw_version",
    "via_device",
    "suggested_area",
    "configuration_url",
}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
ENTITY_CATEGORIES = {"config", "diagnostic"}  # const.py EntityCategory
ENTITY_COMMON_KEYS = AVAILABILITY_KEYS | {
    "device",
    "origin",
    "enabled_by_default",
    "entity_category",
    "entity_picture",
    "icon",
    "json_attributes_topic",
    "json_attributes_template",
    "object_id",
    "default_entity_id",
    "unique_id",
}
# mqtt/config.py MQTT_BASE_SCHEMA + MQTT_RO_SCHEMA
RO_KEYS = {"qos", "encoding", "group", "state_topic", "value_template"}

# mqtt/const.py SUPPORTED_COMPONENTS (excerpt: the platforms whose schema is below).
PLATFORM_KEYS: dict[str, set[str]] = {
    "sensor": RO_KEYS
    | ENTITY_COMMON_KEYS
    | {
        "device_class",
        "expire_after",
        "force_update",
        "last_reset_value_template",
        "name",
        "options",
        "suggested_display_precision",
        "state_class",
        "unit_of_measurement",
    },
    "binary_sensor": RO_KEYS
    | ENTITY_COMMON_KEYS
    | {
        "device_class",
        "expire_after",
        "force_update",
        "name",
        "off_delay",
        "payload_off",
        "payload_on",
    },
    "event": RO_KEYS | ENTITY_COMMON_KEYS | {"device_class", "name", "event_types"},
    # mqtt/button.py PLATFORM_SCHEMA_MODERN: MQTT_BASE_SCHEMA and the button's own keys
    "button": {"qos", "encoding"}
    | ENTITY_COMMON_KEYS
    | {"command_template", "command_topic", "device_class", "name", "payload_press", "retain"},
    # mqtt/image.py PLATFORM_SCHEMA_BASE
    "image": {"qos", "encoding"}
    | ENTITY_COMMON_KEYS
    | {"content_type", "name", "url_topic", "image_topic", "image_encoding", "url_template"},
}
PLATFORM_REQUIRED: dict[str, set[str]] = {
    "sensor": {"state_topic"},
    "binary_sensor": {"state_topic"},
    "event": {"state_topic", "event_types"},
    "button": {"command_topic"},
    "image": set(),  # one of url_topic and image_topic: check_image
}

# sensor/const.py SensorDeviceClass
SENSOR_DEVICE_CLASSES = {
    *("date", "enum", "timestamp", "apparent_power", "aqi", "area", "atmospheric_pressure"),
    *("battery", "blood_glucose_concentration", "carbon_monoxide", "carbon_dioxide"),
    *("conductivity", "current", "data_rate", "data_size", "distance", "duration", "energy"),
    *("energy_distance", "energy_storage", "frequency", "gas", "humidity", "illuminance"),
    *("irradiance", "moisture", "monetary", "nitrogen_dioxide", "nitrogen_monoxide"),
    *("nitrous_oxide", "ozone", "ph", "pm1", "pm10", "pm25", "power_factor", "power"),
    *("precipitation", "precipitation_intensity", "pressure", "reactive_power"),
    *("signal_strength", "sound_pressure", "speed", "sulphur_dioxide", "temperature"),
    *("temperature_delta", "volatile_organic_compounds", "volatile_organic_compounds_parts"),
    *("voltage", "volume", "volume_storage", "volume_flow_rate", "water", "weight"),
    *("wind_direction", "wind_speed"),
}
NON_NUMERIC_DEVICE_CLASSES = {"date", "enum", "timestamp"}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
# const.py UnitOfInformation / UnitOfTime; sensor/const.py DEVICE_CLASS_UNITS and
# DEVICE_CLASS_STATE_CLASSES (excerpt: a device class missing here fails the test).
UNIT_OF_INFORMATION = {
    *("bit", "kbit", "Mbit", "Gbit", "B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"),
    *("KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"),
}
DEVICE_CLASS_UNITS: dict[str, set[str | None]] = {
    "data_size": set(UNIT_OF_INFORMATION),
    "duration": {"d", "h", "min", "s", "ms"},
}
DEVICE_CLASS_STATE_CLASSES: dict[str, set[str]] = {
    "data_size": set(STATE_CLASSES),
    "duration": set(STATE_CLASSES),
    "date": set(),
    "enum": set(),
    "monetary": {"total"},  # never "measurement": a balance takes no state class at all
    "timestamp": set(),
}
# sensor/const.py SensorDeviceClass.MONETARY: "Unit of measurement: ISO 4217 currency
# code"; it has no entry in DEVICE_CLASS_UNITS, so the code's shape is what is checked.
CURRENCY_CODE = re.compile(r"[A-Z]{3}")
# binary_sensor/__init__.py BinarySensorDeviceClass, event/__init__.py EventDeviceClass
BINARY_SENSOR_DEVICE_CLASSES = {
    *("battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door"),
    *("garage_door", "gas", "heat", "light", "lock", "moisture", "motion", "moving"),
    *("occupancy", "opening", "plug", "power", "presence", "problem", "running", "safety"),
    *("smoke", "sound", "tamper", "update", "vibration", "window"),
}
EVENT_DEVICE_CLASSES = {"button", "doorbell", "motion"}
PAYLOAD_NONE = "None"  # mqtt/const.py

# What the bridge publishes on each topic it owns (CONTRACT.md "MQTT topics"),
# as examples; an entity may only read one of these.
ESIM_TOPIC_EXAMPLES = {
    # webhooks, and the provider API's esimStatus (PROVIDER-API.md) read by sync
    "status": ["GOT_RESOURCE", "IN_USE", "CANCEL", "REVOKED", "CREATE", "SUSPENDED", "REVOKE"],
    "smdp_status": ["DOWNLOAD", "ENABLED", "RELEASED"],
    "eid": ["89049032007108882600137544319616"],
    "data_total": ["53687091200"],
    "data_used": ["48335585458"],
    "data_remaining": ["5351505742", "0"],
    "data_remaining_percent": ["10.0", "100.0"],
    "expires_at": ["2024-01-11T08:10:19+00:00"],
    "validity_remaining": ["1"],
    "state": ['{"iccid":"8943108170001029631","order_no":"B25052822150009"}'],
    "event": ['{"notifyType":"SMDP_EVENT","content":{"smdpStatus":"DOWNLOAD"}}'],
    # the provider's API (optional)
    "package": ["Europe 5GB 30Days", "United States 1GB 7Days"],
    "activated_at": ["2025-05-28T22:16:03+00:00"],
}
BRIDGE_TOPIC_EXAMPLES = {
    "state": ["online", "offline"],
    "last_health_check": ["2025-09-11T13:28:09+00:00"],
    "info": ['{"version":"0.1.0","counts":{"webhooks_received":3,"outbox_backlog":0}}'],
    # the provider's API (optional)
    "balance": ["94.00", "0.00", "12345.67"],
    "provider": ["ok", "unauthorized", "unreachable", "error"],
    "last_sync": ["2025-09-11T13:28:09+00:00"],
}

# --- The payloads under test --------------------------------------------------

ICCIDS = [
    "8943108170001029631",
    "89852000263413436720",
    "8997250230000292199",
    "894310817000000003",
]
STATES: dict[str, dict[str, object]] = {
    "empty": {},
    "full": {
        "iccid": ICCIDS[0],
        "eid": "89049032007108882600137544319616",
        "order_no": "B25052822150009",
        "status": "IN_USE",
        "smdp_status": "ENABLED",
        "data_total": 53687091200,
        "data_used": 48335585458,
        "data_remaining": 5351505742,
        "data_remaining_percent": 10.0,
        "expires_at": "2024-01-11T08:10:19+00:00",
        "validity_remaining": 1,
        "validity_unit": "DAY",
        "validity_total": 30,
        "last_event": "VALIDITY_USAGE",
    },
    "hours": {"validity_unit": "HOUR"},
    "unknown_unit": {"validity_unit": "MONTH"},
    "odd_status": {"status": "SOMETHING_NEW", "smdp_status": "", "validity_unit": None},
    # with provider.publish_activation: the QR code image
    "activation": {"qr_code_url": "https://p.qrsim.net/abc.png"},
}
SETTINGS = [("esim", "homeassistant"), ("home/esim-bridge", "ha_discovery")]


def all_payloads() -> Iterator[tuple[str, str, str, bytes]]:
    """(id, base, topic, payload) for the bridge and every eSIM, state and setting, with
    the provider's API configured (`+provider`) and without."""
    for base, prefix in SETTINGS:
        for provider in (False, True):
            how = "+provider" if provider else ""
            yield f"bridge{how}@{base}", base, *bridge_discovery(
                base=base, prefix=prefix, version="0.1.0", provider=provider
            )
            yield f"bridge{how}+replicas@{base}", base, *bridge_discovery(
                base=base, prefix=prefix, version="0.1.0", provider=provider, replicas=True
            )
            for iccid in ICCIDS:
                for name, state in STATES.items():
                    topic, payload = esim_discovery(
                        iccid, state, base=base, prefix=prefix, version="0.1.0",
                        provider=provider,
                    )
                    yield f"{iccid}/{name}{how}@{base}", base, topic, payload


PAYLOADS = list(all_payloads())
CASES = [pytest.param(base, topic, payload, id=case) for case, base, topic, payload in PAYLOADS]

# --- How Home Assistant reads a device payload --------------------------------


def expand(raw: Mapping[str, Any], table: Mapping[str, str], where: str) -> dict[str, Any]:
    """Abbreviations replaced by full names, as discovery.py does; clashes are errors."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        full = table.get(key, key)
        assert full not in out, f"{where}: {key!r} and its other spelling are both present"
        out[full] = value
    return out


def expand_component(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    comp = expand(raw, ABBREVIATIONS, where)
    if isinstance(comp.get("availability"), list):
        comp["availability"] = [
            expand(a, ABBREVIATIONS, f"{where}.availability") for a in comp["availability"]
        ]
    return comp


def components(payload: bytes) -> dict[str, dict[str, Any]]:
    """Each component as its platform sees it: expanded and merged with shared options."""
    device = expand(msgspec.json.decode(payload), ABBREVIATIONS, "top level")
    out = {}
    for cid, raw in device["components"].items():
        comp = expand_component(raw, cid)
        for option in SHARED_OPTIONS:
            if option in device and option not in comp:
                comp[option] = device[option]
        out[cid] = comp
    return out


# --- Checks ---------------------------------------------------------------------


def valid_subscribe_topic(topic: object) -> bool:
    """mqtt/util.py valid_topic + valid_subscribe_topic."""
    if not isinstance(topic, str) or not topic or len(topic.encode()) > 65535:
        return False
    if "\0" in topic or any(0x1 <= ord(c) <= 0x1F or 0x7F <= ord(c) <= 0x9F for c in topic):
        return False
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            return False
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
    return True


def is_url(value: object) -> bool:
    """config_validation.configuration_url: http(s) with a host."""
    return isinstance(value, str) and re.fullmatch(r"https?://[^/\s]+(/\S*)?", value) is not None


def enum_template_outputs(template: str) -> list[str]:
    """The values an enum template can render besides "None"; fails on any other shape."""
    m = re.fullmatch(r"\{\{ value if value in \[(.*)\] else 'None' \}\}", template)
    assert m, f"not a recognised enum template: {template!r}"
    return re.findall(r"'([^']*)'", m.group(1))


def event_template_types(template: str) -> set[str]:
    """Event types the event template can emit: every quoted list in its choice."""
    choice = re.search(r"\{%- set t = (.*?) -%\}", template)
    assert choice, "event template does not choose an event type"
    lists = re.findall(r"\[(.*?)\]", choice.group(1))
    return {value for lst in lists for value in re.findall(r"'(\w+)'", lst)}


def numeric(value: str) -> bool:
    """SensorEntity.state: int() without a dot, float() otherwise, finite."""
    try:
        number = int(value) if "." not in value and "e" not in value else float(value)
    except ValueError:
        return False
    return number == number and abs(number) != float("inf")


def aware(value: str) -> bool:
    """A timestamp sensor raises for a datetime without timezone."""
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def check_device(device: dict[str, Any]) -> None:
    dev = expand(device["device"], DEVICE_ABBREVIATIONS, "dev")
    assert set(dev) <= DEVICE_INFO_KEYS, f"dev: unknown keys {set(dev) - DEVICE_INFO_KEYS}"
    assert dev.get("identifiers") or dev.get("connections"), "dev needs an identifier"
    ids = dev.get("identifiers")
    assert isinstance(ids, list | str), "dev.identifiers: a list of strings"
    assert all(isinstance(i, str) and i for i in ([ids] if isinstance(ids, str) else ids))
    for key, value in dev.items():
        if key not in ("identifiers", "connections"):
            assert isinstance(value, str) and value, f"dev.{key}: a non-empty string"
    if "configuration_url" in dev:
        assert is_url(dev["configuration_url"]), "dev.configuration_url must be a URL"

    origin = expand(device["origin"], ORIGIN_ABBREVIATIONS, "o")
    assert set(origin) <= ORIGIN_KEYS, f"o: unknown keys {set(origin) - ORIGIN_KEYS}"
    assert isinstance(origin.get("name"), str) and origin["name"], "o.name is required"
    assert isinstance(origin.get("sw_version", ""), str)
    if "support_url" in origin:
        assert is_url(origin["support_url"]), "o.support_url must be a URL"


def check_common(cid: str, comp: dict[str, Any], platform: str) -> None:
    allowed, required = PLATFORM_KEYS[platform], PLATFORM_REQUIRED[platform]
    assert set(comp) <= allowed, f"{cid}: keys HA would drop: {sorted(set(comp) - allowed)}"
    assert required <= set(comp), f"{cid}: missing {sorted(required - set(comp))}"
    if "state_topic" in comp:
        assert valid_subscribe_topic(comp["state_topic"]), f"{cid}: bad state_topic"
    assert isinstance(comp.get("unique_id"), str) and comp["unique_id"], f"{cid}: no unique_id"
    assert isinstance(comp.get("name"), str) and comp["name"], (
        f"{cid}: has_entity_name needs a name"
    )
    assert not ("availability" in comp and "availability_topic" in comp), f"{cid}: exclusive"
    if "availability_topic" in comp:
        assert valid_subscribe_topic(comp["availability_topic"]), f"{cid}: availability_topic"
    for key in ("payload_available", "payload_not_available", "value_template"):
        assert isinstance(comp.get(key, ""), str), f"{cid}.{key}: a string"
    if "icon" in comp:
        assert isinstance(comp["icon"], str) and ":" in comp["icon"], f"{cid}: icon prefix:name"
    if "entity_category" in comp:
        assert comp["entity_category"] in ENTITY_CATEGORIES, f"{cid}: entity_category"
    assert "expire_after" not in comp, f"{cid}: webhooks are days apart, no expire_after"


def check_sensor(cid: str, comp: dict[str, Any], examples: list[str]) -> None:
    device_class = comp.get("device_class")
    state_class = comp.get("state_class")
    unit = comp.get("unit_of_measurement")
    options: list[str] | None = comp.get("options")
    precision = comp.get("suggested_display_precision")
    assert device_class in SENSOR_DEVICE_CLASSES | {None}, f"{cid}: device class {device_class!r}"
    assert state_class in STATE_CLASSES | {None}, f"{cid}: state class {state_class!r}"
    assert precision is None or (type(precision) is int and precision >= 0), f"{cid}: precision"
    if options is not None:
        assert isinstance(options, list) and options, f"{cid}: empty options"
        assert all(isinstance(o, str) for o in options), f"{cid}: options are strings"
        assert not state_class and not unit, f"{cid}: options with state_class or unit"
    if device_class == "enum":
        assert options, f"{cid}: an enum sensor needs options"
    elif options is not None:
        assert device_class == "enum", f"{cid}: options need device class enum"
    if "last_reset_value_template" in comp:
        assert state_class == "total", f"{cid}: last_reset needs state class total"
    if device_class in NON_NUMERIC_DEVICE_CLASSES:
        assert unit is None, f"{cid}: a unit on non-numeric device class {device_class}"
        assert precision is None, f"{cid}: display precision on a non-numeric sensor"
    if device_class is not None:
        if state_class is not None:
            assert device_class in DEVICE_CLASS_STATE_CLASSES, f"{cid}: rule not encoded"
            assert state_class in DEVICE_CLASS_STATE_CLASSES[device_class], (
                f"{cid}: state class {state_class!r} with device class {device_class!r}"
            )
        if device_class == "monetary":
            assert isinstance(unit, str) and CURRENCY_CODE.fullmatch(unit), f"{cid}: {unit!r}"
        elif device_class not in NON_NUMERIC_DEVICE_CLASSES:
            assert device_class in DEVICE_CLASS_UNITS, f"{cid}: unit rule not encoded"
            assert unit in DEVICE_CLASS_UNITS[device_class], f"{cid}: unit {unit!r}"

    template = comp.get("value_template")
    if device_class == "enum" and options:
        # Every value it can show must be an option, or "None" (unknown).
        rendered = enum_template_outputs(template) if template else examples
        assert set(rendered) <= set(options), f"{cid}: can render a value outside options"
        for value in examples:
            assert value in options, f"{cid}: documented value {value!r} is not an option"
        return
    if template is not None:
        return  # rendered by Jinja; the unit tests pin these templates
    numeric_expected = device_class not in NON_NUMERIC_DEVICE_CLASSES and (
        device_class is not None or state_class or unit or precision is not None
    )
    for value in examples:
        if device_class == "timestamp":
            assert aware(value), f"{cid}: timestamp {value!r} without timezone"
        elif numeric_expected:
            assert numeric(value), f"{cid}: {value!r} is not a number"


def check_binary_sensor(cid: str, comp: dict[str, Any], examples: list[str]) -> None:
    assert comp.get("device_class") in BINARY_SENSOR_DEVICE_CLASSES | {None}, f"{cid}: class"
    on, off = comp.get("payload_on", "ON"), comp.get("payload_off", "OFF")
    if "value_template" not in comp:
        for value in examples:
            assert value in (on, off, PAYLOAD_NONE), f"{cid}: {value!r} matches neither payload"


def check_event(cid: str, comp: dict[str, Any]) -> None:
    assert comp.get("device_class") in EVENT_DEVICE_CLASSES | {None}, f"{cid}: class"
    types = comp["event_types"]
    assert isinstance(types, list) and types, f"{cid}: event_types must be a non-empty list"
    assert all(isinstance(t, str) and t for t in types) and len(set(types)) == len(types)
    template = comp.get("value_template")
    assert template, f"{cid}: the event payload needs a template to become {{'event_type': ..}}"
    assert event_template_types(template) <= set(types), f"{cid}: can emit an unknown type"
    assert "event_type=" in template and "to_json" in template, f"{cid}: JSON with event_type"
    assert f"else '{PAYLOAD_NONE}'" in template, f"{cid}: what it cannot type must be ignored"


def topic_examples(base: str, state_topic: str) -> list[str]:
    """The contract's example payloads for a topic the bridge publishes; fails otherwise."""
    bridge = f"{base}/bridge/"
    if state_topic.startswith(bridge):
        key = state_topic.removeprefix(bridge)
        assert key in BRIDGE_TOPIC_EXAMPLES, f"{state_topic} is not a bridge topic"
        return BRIDGE_TOPIC_EXAMPLES[key]
    iccid, _, key = state_topic.removeprefix(f"{base}/").partition("/")
    assert iccid in ICCIDS and key in ESIM_TOPIC_EXAMPLES, f"{state_topic}: not a contract topic"
    return ESIM_TOPIC_EXAMPLES[key]


def check_button(cid: str, comp: dict[str, Any]) -> None:
    """mqtt/button.py: command_topic a valid publish topic (util.valid_publish_topic: no
    wildcards), retain a boolean, device_class one of ButtonDeviceClass. Ours besides: never
    retained (CONTRACT.md: a retained press would fire again on every reconnect)."""
    topic = comp["command_topic"]
    assert isinstance(topic, str) and topic and not {"+", "#"} & set(topic), f"{cid}: topic"
    assert comp.get("retain", False) is False, f"{cid}: a button's command must not be retained"
    assert comp.get("device_class") in (None, "identify", "restart", "update"), cid
    assert isinstance(comp.get("payload_press", "PRESS"), str), cid


def check_image(cid: str, comp: dict[str, Any]) -> None:
    """mqtt/image.py: exactly one of url_topic and image_topic (vol.Exclusive, and
    validate_topic_required), a valid subscribe topic; content_type not with url_topic."""
    topics = [key for key in ("url_topic", "image_topic") if key in comp]
    assert len(topics) == 1, f"{cid}: one of url_topic and image_topic"
    assert valid_subscribe_topic(comp[topics[0]]), f"{cid}: bad {topics[0]}"
    assert not ("content_type" in comp and "url_topic" in comp), f"{cid}: content_type"


def check_payload(base: str, topic: str, payload: bytes) -> None:
    """Everything Home Assistant checks before it creates the device's entities."""
    prefix, _, rest = topic.partition("/device/")
    m = TOPIC_MATCHER.fullmatch(f"device/{rest}")
    assert prefix and m and m.group("component") == "device", f"not a device topic: {topic}"

    device = expand(msgspec.json.decode(payload), ABBREVIATIONS, "top level")
    assert set(device) <= DEVICE_DISCOVERY_KEYS, f"rejected: {set(device) - DEVICE_DISCOVERY_KEYS}"
    assert set(device) >= DEVICE_DISCOVERY_REQUIRED, "dev, o and cmps are required"
    check_device(device)
    cmps = device["components"]
    assert isinstance(cmps, dict) and cmps, "cmps: a non-empty mapping"
    for cid, raw in cmps.items():
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", cid), f"component id {cid!r}"
        comp = expand_component(raw, cid)
        assert comp.get("platform") in PLATFORM_KEYS, f"{cid}: device discovery needs p"
        assert len(comp) > 1, f"{cid}: only a platform means 'remove this component'"

    for cid, comp in components(payload).items():
        platform = comp.pop("platform")
        check_common(cid, comp, platform)
        if platform == "button":
            check_button(cid, comp)
        elif platform == "image":
            check_image(cid, comp)
        elif platform == "sensor":
            check_sensor(cid, comp, topic_examples(base, comp["state_topic"]))
        elif platform == "binary_sensor":
            check_binary_sensor(cid, comp, topic_examples(base, comp["state_topic"]))
        else:
            check_event(cid, comp)
        # Unavailable with the bridge, except the entity that shows the bridge itself.
        if comp.get("state_topic") == f"{base}/bridge/state":
            assert not AVAILABILITY_KEYS & set(comp), f"{cid}: would hide 'offline'"
        else:
            assert comp.get("availability_topic") == f"{base}/bridge/state", f"{cid}: availability"
            assert comp.get("payload_available", "online") == "online", f"{cid}: online"
            assert comp.get("payload_not_available", "offline") == "offline", f"{cid}: offline"


# --- Tests ----------------------------------------------------------------------


@pytest.mark.parametrize(("base", "topic", "payload"), CASES)
def test_discovery_payload_passes_home_assistant_rules(
    base: str, topic: str, payload: bytes
) -> None:
    check_payload(base, topic, payload)


def test_unique_ids_are_unique_across_all_devices() -> None:
    """Home Assistant refuses a second entity with a unique_id already in use."""
    for setting_base, _ in SETTINGS:
        seen: dict[str, str] = {}
        for _, base, topic, payload in PAYLOADS:
            if base != setting_base:
                continue
            for comp in components(payload).values():
                uid = comp["unique_id"]
                assert seen.setdefault(uid, topic) == topic, f"{uid}: {topic} and {seen[uid]}"


# (notifyType, smdpStatus) of the provider's documented webhooks (PROVIDER.md).
DOCUMENTED_WEBHOOKS = [
    ("CHECK_HEALTH", None),
    ("ORDER_STATUS", None),
    *(("SMDP_EVENT", status) for status in SMDP_STATUSES),
    ("ESIM_STATUS", "RELEASED"),
    ("DATA_USAGE", None),
    ("VALIDITY_USAGE", None),
]


@pytest.mark.parametrize(("notify_type", "smdp_status"), DOCUMENTED_WEBHOOKS)
def test_every_documented_webhook_has_an_event_type(
    notify_type: str, smdp_status: str | None
) -> None:
    """An SMDP_EVENT fires as its smdpStatus, any other webhook as its notifyType."""
    _, payload = esim_discovery(ICCIDS[0], {}, base="esim", prefix="ha", version="0")
    event = components(payload)["last_event"]
    expected = smdp_status if notify_type == "SMDP_EVENT" else notify_type
    assert expected in event_template_types(event["value_template"])
    assert expected in event["event_types"]


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = cfg
        for key in parents:
            target = target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return change


_DELETE = object()
MUTATIONS = {
    "enum with state_class": _set("cmps.status.state_class", "measurement"),
    "enum without options": _set("cmps.status.options", _DELETE),
    "empty options": _set("cmps.status.options", []),
    "options on a numeric sensor": _set("cmps.data_used.options", ["A"]),
    "enum template outside options": _set(
        "cmps.status.value_template", "{{ value if value in ['FOO'] else 'None' }}"
    ),
    "data_size in bytes spelled out": _set("cmps.data_total.unit_of_measurement", "bytes"),
    "duration in days spelled out": _set("cmps.validity_remaining.unit_of_measurement", "days"),
    "timestamp with a unit": _set("cmps.expires_at.unit_of_measurement", "s"),
    "timestamp with state_class": _set("cmps.expires_at.state_class", "measurement"),
    "unknown device class": _set("cmps.data_used.device_class", "bytes"),
    "negative precision": _set("cmps.data_used.suggested_display_precision", -1),
    "no platform": _set("cmps.eid.p", _DELETE),
    "unsupported platform": _set("cmps.eid.p", "text_sensor"),
    "abbreviation clash": _set("cmps.eid.uniq_id", "other"),
    "silently dropped key": _set("cmps.data_used.suggested_unit_of_measurement", "GiB"),
    "expire_after": _set("cmps.data_used.expire_after", 86400),
    "icon without prefix": _set("cmps.eid.icon", "sim"),
    "unknown entity category": _set("cmps.eid.entity_category", "system"),
    "both availability forms": _set("cmps.eid.availability", [{"topic": "esim/bridge/state"}]),
    "no availability": _set("cmps.eid.availability_topic", _DELETE),
    "non-contract topic": _set("cmps.eid.state_topic", "esim/8943108170001029631/imei"),
    "malformed wildcard": _set("cmps.eid.state_topic", "esim/8943108170001029631/eid#"),
    "no name": _set("cmps.eid.name", _DELETE),
    "event without types": _set("cmps.last_event.event_types", _DELETE),
    "event template with unknown type": _set(
        "cmps.last_event.event_types", ["SMDP_EVENT", "ESIM_STATUS"]
    ),
    "unknown top-level key": _set("retain", True),
    "no origin": _set("o", _DELETE),
    "origin without name": _set("o.name", _DELETE),
    "origin with a bad url": _set("o.support_url", "github.com/x"),
    "device without identifiers": _set("dev.identifiers", []),
    "unknown device key": _set("dev.firmware", "1"),
    "only a platform": _set("cmps.eid", {"p": "sensor"}),
}


PROVIDER_MUTATIONS = {
    "monetary with measurement": _set("cmps.balance.state_class", "measurement"),
    "monetary with total_increasing": _set("cmps.balance.state_class", "total_increasing"),
    "monetary without a currency": _set("cmps.balance.unit_of_measurement", _DELETE),
    "monetary in a symbol": _set("cmps.balance.unit_of_measurement", "$"),
    "provider enum without options": _set("cmps.provider.options", _DELETE),
    "provider enum missing a value": _set("cmps.provider.options", ["ok", "error"]),
    "provider enum with a unit": _set("cmps.provider.unit_of_measurement", "x"),
    "last sync with a unit": _set("cmps.last_sync.unit_of_measurement", "s"),
    "last sync with state_class": _set("cmps.last_sync.state_class", "measurement"),
    "last sync as config": _set("cmps.last_sync.entity_category", "system"),
    "balance on a topic of no one": _set("cmps.balance.state_topic", "esim/bridge/credit"),
}


def test_monetary_with_total_passes() -> None:
    """The one state class Home Assistant allows with `monetary`: the rule is not just
    "no state class"."""
    topic, payload = bridge_discovery(base="esim", prefix="ha", version="0", provider=True)
    cfg = msgspec.json.decode(payload)
    cfg["cmps"]["balance"]["state_class"] = "total"
    check_payload("esim", topic, msgspec.json.encode(cfg))


@pytest.mark.parametrize("mutation", PROVIDER_MUTATIONS.values(), ids=PROVIDER_MUTATIONS.keys())
def test_the_checker_catches_what_home_assistant_rejects_of_the_provider_entities(
    mutation: Callable[[dict[str, Any]], None],
) -> None:
    topic, payload = bridge_discovery(
        base="esim", prefix="homeassistant", version="0.1.0", provider=True
    )
    check_payload("esim", topic, payload)
    cfg = msgspec.json.decode(payload)
    mutation(cfg)
    with pytest.raises(AssertionError):
        check_payload("esim", topic, msgspec.json.encode(cfg))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("cmps.activated_at.state_class", "measurement"),
        ("cmps.activated_at.unit_of_measurement", "s"),
        ("cmps.package.state_class", "measurement"),
        ("cmps.package.state_topic", "esim/8943108170001029631/qr_code_url"),
        ("cmps.qr_code.image_topic", "esim/8943108170001029631/qr_code_url"),
        ("cmps.qr_code.url_topic", "esim/#/qr_code_url"),
        ("cmps.qr_code.content_type", "image/png"),
        ("cmps.refresh.retain", True),
    ],
)
def test_the_checker_catches_what_home_assistant_rejects_of_the_esim_provider_entities(
    path: str, value: object
) -> None:
    state = {**STATES["full"], **STATES["activation"]}
    topic, payload = esim_discovery(
        ICCIDS[0], state, base="esim", prefix="homeassistant", version="0.1.0", provider=True,
    )
    check_payload("esim", topic, payload)
    cfg = msgspec.json.decode(payload)
    _set(path, value)(cfg)
    with pytest.raises(AssertionError):
        check_payload("esim", topic, msgspec.json.encode(cfg))


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_the_checker_catches_what_home_assistant_rejects(
    mutation: Callable[[dict[str, Any]], None],
) -> None:
    """The rules above are only proof if a broken payload fails them."""
    topic, payload = esim_discovery(
        ICCIDS[0], STATES["full"], base="esim", prefix="homeassistant", version="0.1.0"
    )
    check_payload("esim", topic, payload)
    cfg = msgspec.json.decode(payload)
    mutation(cfg)
    with pytest.raises(AssertionError):
        check_payload("esim", topic, msgspec.json.encode(cfg))
