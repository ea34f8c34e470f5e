"""Home Assistant MQTT discovery, as one extension fed by state.

`HomeAssistant` turns the bridge's settings and each eSIM's state into retained
discovery messages, and owns the bridge's device; the store writes what it returns to
the table of retained topics (owner `homeassistant`) and the outbox, and sends a config
again only when its bytes changed, so every payload here is deterministic: same
inputs, same bytes. It may depend only on what changes the config itself (the validity
unit), never on volatile values (data counters, timestamps, the last event). Pure
functions, no I/O.

Device-based discovery (Home Assistant 2024.11+): one retained message per
device on ``<prefix>/device/<object_id>/config`` with ``dev``, ``o`` and
``cmps``; every component carries ``p`` (its platform) and a stable
``unique_id``. Entity options use their full names so a reader needs no
abbreviation table; only the device-discovery keys the contract names
(``dev``, ``o``, ``cmps``, ``p``) are abbreviated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Final

import msgspec

from bridge.models import KNOWN_TYPES
from bridge.outbox import Message
from bridge.topics import Entity, Record, Topics, ended_since

__all__ = [
    "ESIM_STATUSES",
    "EVENT_TYPES",
    "PROVIDER_STATES",
    "SMDP_STATUSES",
    "HomeAssistant",
    "birth_topic",
    "bridge_discovery",
    "bridge_discovery_topic",
    "esim_config_inputs",
    "esim_discovery",
    "esim_discovery_topic",
]

Config = dict[str, object]

ORIGIN_NAME: Final = "esim-bridge"
SUPPORT_URL: Final = "https://github.com/esim-bridge/esim-bridge"
MANUFACTURER: Final = "eSIM Access"
BRIDGE_OBJECT_ID: Final = "esim_bridge"

# The values the provider documents (PROVIDER.md, PROVIDER-API.md), in the order of an
# eSIM's life. Anything else must show as unknown in Home Assistant, never break the
# entity. The API's esimStatus adds the states before GOT_RESOURCE and SUSPENDED, and
# spells REVOKED as REVOKE: both are kept, so a profile read by sync shows as itself.
ESIM_STATUSES: Final = (
    "CREATE",
    "PAYING",
    "PAID",
    "GETTING_RESOURCE",
    "GOT_RESOURCE",
    "IN_USE",
    "USED_UP",
    "USED_EXPIRED",
    "UNUSED_EXPIRED",
    "CANCEL",
    "SUSPENDED",
    "REVOKE",
    "REVOKED",
)
SMDP_STATUSES: Final = ("DOWNLOAD", "INSTALLATION", "ENABLED", "DISABLED", "DELETED", "RELEASED")
# What `<base>/bridge/provider` says about the provider's API (CONTRACT.md).
PROVIDER_STATES: Final = ("ok", "unauthorized", "unreachable", "error")
# An SMDP_EVENT fires as its smdpStatus, every other webhook as its notifyType.
EVENT_TYPES: Final = KNOWN_TYPES + SMDP_STATUSES

# Provider durationUnit -> Home Assistant duration unit (UnitOfTime values).
_DURATION_UNITS: Final = MappingProxyType({"DAY": "d", "HOUR": "h", "MINUTE": "min", "SECOND": "s"})
_DEFAULT_VALIDITY_UNIT: Final = "DAY"  # the only unit the provider documents

# The MQTT sensor turns the rendered string "None" into an unknown state
# (PAYLOAD_NONE in homeassistant/components/mqtt/sensor.py); the MQTT event
# entity ignores it quietly. Templates map what they cannot use to it.
_NONE: Final = "None"

_DIAGNOSTIC: Final = MappingProxyType({"entity_category": "diagnostic"})


class HomeAssistant:
    """The extension: the bridge's device, and a device per eSIM, from its state.

    The iccids it is given were checked once, by `topics.route`. Home Assistant removes
    every component of a device-based config when its topic gets an empty payload, so
    clearing one topic per device removes it (the store does that for every config this
    extension no longer returns, with discovery turned off, or the prefix changed).

    `provider`: the provider's API is configured (an access code is set). Only then do
    the entities fed by it exist (per eSIM: package, activated; on the bridge: balance,
    provider, last sync): without it their topics are never published.
    """

    OWNER: Final = "homeassistant"  # of its rows in the table of retained topics

    def __init__(
        self, topics: Topics, *, prefix: str, version: str, provider: bool = False,
        forget_ended_days: float = 30, replicas: bool = False,
    ) -> None:
        self.topics = topics
        self.prefix = prefix
        self.version = version
        self.provider = provider
        self.replicas = replicas
        self.forget_after = forget_ended_days * 86400.0

    def bridge(self) -> list[Message]:
        """The bridge's own device."""
        topic, payload = bridge_discovery(
            base=self.topics.base, prefix=self.prefix, version=self.version,
            provider=self.provider, replicas=self.replicas,
        )
        return [Message(topic, payload, True)]

    def entity(self, entity: Entity, record: Record, now: float) -> list[Message]:
        """The configs an entity's state gives at `now`: a device per eSIM, none for the
        rest, nor for an eSIM that ended `homeassistant.forget_ended_days` ago (its
        retained topics stay; only Home Assistant forgets it)."""
        if entity.kind != "esim" or self.forgotten(record, now):
            return []
        topic, payload = esim_discovery(
            entity.name, record.fields, base=self.topics.base, prefix=self.prefix,
            version=self.version, provider=self.provider,
        )
        return [Message(topic, payload, True)]

    def config_topic(self, entity: Entity) -> str:
        """Where an eSIM's device config is (an empty retained payload removes it)."""
        return esim_discovery_topic(entity.name, prefix=self.prefix)

    def forgotten(self, record: Record, now: float) -> bool:
        ended = ended_since(record)
        return ended is not None and now - ended >= self.forget_after

    @staticmethod
    def changes(prior: Record | None, record: Record) -> bool:
        """Whether an event may have changed the entity's configs: when not (nearly
        always after its first event), the store skips making and comparing them (an
        eSIM's config is 5 KB of JSON: ~100 µs a webhook, a quarter of its store work)."""
        return prior is None or esim_config_inputs(prior.fields) != esim_config_inputs(
            record.fields
        )


def birth_topic(prefix: str) -> str:
    """Where Home Assistant says `online` when it starts: then every retained topic is
    published again (with discovery off too: the state topics may be all it reads)."""
    return f"{prefix}/status"


def esim_discovery_topic(iccid: str, *, prefix: str) -> str:
    """Discovery topic of one eSIM's device; an empty retained payload removes it."""
    return f"{prefix}/device/esim_{iccid}/config"


def bridge_discovery_topic(*, prefix: str) -> str:
    """Discovery topic of the bridge's own device."""
    return f"{prefix}/device/{BRIDGE_OBJECT_ID}/config"


# The state fields an eSIM's config is made from: with these equal, so is the config
# (for the same iccid and settings), so an event that changes none of them needs no look
# at discovery at all. `esim_discovery` reads no other field; a test holds it to that.
ESIM_CONFIG_FIELDS: Final = ("validity_unit", "qr_code_url")


def esim_config_inputs(state: Mapping[str, object]) -> tuple[object, ...]:
    """What of an eSIM's state its discovery config depends on."""
    return tuple(state.get(name) for name in ESIM_CONFIG_FIELDS)


def esim_discovery(
    iccid: str,
    state: Mapping[str, object],
    *,
    base: str,
    prefix: str,
    version: str,
    provider: bool = False,
) -> tuple[str, bytes]:
    """(topic, retained payload) of the device-based discovery config for one eSIM; of
    `state` it reads only ESIM_CONFIG_FIELDS. With `provider`, also the entities only the
    provider's API feeds (package, activated, the Refresh button), and the QR code image
    while the state has its URL (only with provider.publish_activation)."""
    topic = esim_discovery_topic(iccid, prefix=prefix)
    topics = Topics(base)
    uid = f"esim_{iccid}"
    avail = _availability(topics)

    def sensor(key: str, name: str, options: Config, state_topic: str = "") -> Config:
        return _entity(
            "sensor", uid, key, name, state_topic or topics.esim(iccid, key), options, avail
        )

    validity = _validity_unit(state.get("validity_unit"))
    cmps: Config = {
        "status": sensor("status", "Status", _enum(ESIM_STATUSES, "mdi:sim")),
        "smdp_status": sensor(
            "smdp_status",
            "SM-DP+ status",
            {**_enum(SMDP_STATUSES, "mdi:cloud-download-outline"), **_DIAGNOSTIC},
        ),
        "data_remaining": sensor(
            "data_remaining", "Data remaining", _data_size("mdi:signal-cellular-3")
        ),
        "data_used": sensor("data_used", "Data used", _data_size("mdi:chart-donut")),
        "data_total": sensor("data_total", "Data total", _data_size("mdi:database")),
        "data_remaining_percent": sensor(
            "data_remaining_percent",
            "Data remaining percent",
            {
                "unit_of_measurement": "%",
                "state_class": "measurement",
                "suggested_display_precision": 1,
                "icon": "mdi:gauge",
            },
        ),
        "expires_at": sensor(
            "expires_at",
            "Expires",
            {"device_class": "timestamp", "icon": "mdi:calendar-clock"},
        ),
        "validity_remaining": sensor(
            "validity_remaining",
            "Validity remaining",
            {**validity, "state_class": "measurement", "icon": "mdi:timer-sand"},
        ),
        "last_event": _entity(
            "event",
            uid,
            "last_event",
            "Last event",
            topics.esim(iccid, "event"),
            {
                "event_types": list(EVENT_TYPES),
                "value_template": _EVENT_TEMPLATE,
                "icon": "mdi:webhook",
            },
            avail,
        ),
        "eid": sensor("eid", "EID", {"icon": "mdi:identifier", **_DIAGNOSTIC}),
        "order_no": sensor(
            "order_no",
            "Order number",
            {
                "value_template": _json_field_template("order_no"),
                "icon": "mdi:receipt-text-outline",
                **_DIAGNOSTIC,
            },
            state_topic=topics.esim(iccid, "state"),
        ),
    }
    if provider:
        cmps["package"] = sensor("package", "Package", {"icon": "mdi:package-variant-closed"})
        cmps["activated_at"] = sensor(
            "activated_at",
            "Activated",
            {"device_class": "timestamp", "icon": "mdi:calendar-check"},
        )
        # Never retained: a retained press would come again on every reconnect.
        cmps["refresh"] = {
            "p": "button",
            "name": "Refresh",
            "unique_id": f"{uid}_refresh",
            "command_topic": topics.esim(iccid, "refresh"),
            "payload_press": "PRESS",
            "retain": False,
            "icon": "mdi:refresh",
            **avail,
        }
        # Only while its URL topic holds one: Home Assistant errs on an empty URL, so the
        # image leaves the config before the topic is cleared (the store sends in order).
        if state.get("qr_code_url"):
            cmps["qr_code"] = {
                "p": "image",
                "name": "QR code",
                "unique_id": f"{uid}_qr_code",
                "url_topic": topics.esim(iccid, "qr_code_url"),
                "icon": "mdi:qrcode",
                **avail,
            }
    device: Config = {
        "identifiers": [uid],
        "name": f"eSIM …{iccid[-4:]}",
        "manufacturer": MANUFACTURER,
        "model": "eSIM",
        "serial_number": iccid,
        "via_device": BRIDGE_OBJECT_ID,
    }
    return topic, _encode(device, version, cmps)


def bridge_discovery(
    *, base: str, prefix: str, version: str, provider: bool = False, replicas: bool = False
) -> tuple[str, bytes]:
    """(topic, payload) for the bridge's own device: f"{prefix}/device/esim_bridge/config".

    With `provider` (the provider's API is configured), also the account's balance, how
    the provider answers and the last complete sync; with `replicas` (the store on
    PostgreSQL, which several bridges may share), which one publishes. Without them the
    payload is what it was before they existed, byte for byte."""
    topics = Topics(base)
    uid = BRIDGE_OBJECT_ID
    avail = _availability(topics)
    cmps: Config = {
        # No availability on purpose: it would read this very topic, and an
        # unavailable entity could never show "disconnected".
        "connectivity": _entity(
            "binary_sensor",
            uid,
            "connectivity",
            "Connectivity",
            topics.bridge_state,
            {"device_class": "connectivity", "payload_on": "online", "payload_off": "offline"},
            {},
        ),
        "last_health_check": _entity(
            "sensor",
            uid,
            "last_health_check",
            "Last health check",
            topics.last_health_check,
            {
                "device_class": "timestamp",
                "icon": "mdi:heart-pulse",
                "entity_category": "diagnostic",
            },
            avail,
        ),
        "webhooks_received": _entity(
            "sensor",
            uid,
            "webhooks_received",
            "Webhooks received",
            topics.bridge_info,
            {
                "value_template": _count_template("webhooks_received"),
                "state_class": "total_increasing",
                "icon": "mdi:webhook",
            },
            avail,
        ),
        "outbox_backlog": _entity(
            "sensor",
            uid,
            "outbox_backlog",
            "Outbox backlog",
            topics.bridge_info,
            {
                "value_template": _count_template("outbox_backlog"),
                "state_class": "measurement",
                "icon": "mdi:tray-full",
                "entity_category": "diagnostic",
            },
            avail,
        ),
    }
    if replicas:
        cmps["publisher"] = _entity(
            "sensor",
            uid,
            "publisher",
            "Publisher",
            topics.bridge_info,
            {"value_template": _json_field_template("publisher"), "icon": "mdi:server-network",
             **_DIAGNOSTIC},
            avail,
        )
    if provider:
        cmps.update(_provider_components(topics, avail))
    device: Config = {
        "identifiers": [uid],
        "name": "eSIM bridge",
        "manufacturer": ORIGIN_NAME,
        "model": "esim-bridge",
        "sw_version": version,
    }
    return bridge_discovery_topic(prefix=prefix), _encode(device, version, cmps)


def _provider_components(topics: Topics, avail: Config) -> Config:
    """The bridge's entities fed by the provider's API, after the bridge's own."""
    uid = BRIDGE_OBJECT_ID
    return {
        # No state_class: Home Assistant allows only `total` with `monetary` (and rejects
        # `measurement`); a balance is a level, not a running total.
        "balance": _entity(
            "sensor",
            uid,
            "balance",
            "Balance",
            topics.balance,
            {
                "device_class": "monetary",
                "unit_of_measurement": "USD",
                "suggested_display_precision": 2,
                "icon": "mdi:cash",
            },
            avail,
        ),
        "provider": _entity(
            "sensor",
            uid,
            "provider",
            "Provider",
            topics.provider,
            {**_enum(PROVIDER_STATES, "mdi:cloud-check-outline"), **_DIAGNOSTIC},
            avail,
        ),
        "last_sync": _entity(
            "sensor",
            uid,
            "last_sync",
            "Last sync",
            topics.last_sync,
            {"device_class": "timestamp", "icon": "mdi:cloud-sync-outline", **_DIAGNOSTIC},
            avail,
        ),
    }


def _encode(device: Config, version: str, cmps: Config) -> bytes:
    """Compact JSON in the order built, so equal inputs give equal bytes."""
    origin: Config = {"name": ORIGIN_NAME, "sw_version": version, "support_url": SUPPORT_URL}
    return msgspec.json.encode({"dev": device, "o": origin, "cmps": cmps})


def _availability(topics: Topics) -> Config:
    """Every entity goes unavailable with the bridge (its last will says offline)."""
    return {
        "availability_topic": topics.bridge_state,
        "payload_available": "online",
        "payload_not_available": "offline",
    }


def _entity(
    platform: str,
    uid: str,
    key: str,
    name: str,
    state_topic: str,
    options: Config,
    availability: Config,
) -> Config:
    """One component: platform first, then identity, topic, options, availability."""
    return {
        "p": platform,
        "name": name,
        "unique_id": f"{uid}_{key}",
        "state_topic": state_topic,
        **options,
        **availability,
    }


def _enum(options: tuple[str, ...], icon: str) -> Config:
    """An enum sensor whose unknown values show as unknown instead of failing."""
    return {
        "device_class": "enum",
        "options": list(options),
        "value_template": _enum_template(options),
        "icon": icon,
    }


def _data_size(icon: str) -> Config:
    """A byte counter: the topic holds an integer; Home Assistant can convert the unit."""
    return {
        "device_class": "data_size",
        "unit_of_measurement": "B",
        "state_class": "measurement",
        "suggested_display_precision": 0,
        "icon": icon,
    }


def _validity_unit(unit: object) -> Config:
    """Unit of validity remaining: a duration when the provider's unit is known.

    An unknown unit keeps its own name and drops the device class, whose unit
    list Home Assistant enforces.
    """
    name = unit.strip().upper() if isinstance(unit, str) else ""
    name = name or _DEFAULT_VALIDITY_UNIT
    if name in _DURATION_UNITS:
        return {"device_class": "duration", "unit_of_measurement": _DURATION_UNITS[name]}
    return {"unit_of_measurement": name.lower()}


def _jinja_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _enum_template(options: Iterable[str]) -> str:
    """Pass known values through, turn anything else into unknown.

    Home Assistant raises for an enum sensor state outside ``options``
    (recent MQTT versions drop it and keep the stale state instead); "None"
    makes it ``unknown`` either way.
    """
    return f"{{{{ value if value in {_jinja_list(options)} else '{_NONE}' }}}}"


def _json_field_template(key: str) -> str:
    """One field of the JSON state topic; unknown while the field is missing."""
    return (
        f"{{{{ value_json.{key} if value_json is defined and value_json.{key} is defined"
        f" and value_json.{key} is not none else '{_NONE}' }}}}"
    )


def _count_template(key: str) -> str:
    """One counter of bridge/info; unknown if the JSON does not carry it."""
    return (
        f"{{{{ value_json.counts.{key} if value_json is defined and value_json.counts"
        f" is mapping and value_json.counts.{key} is number else '{_NONE}' }}}}"
    )


# The MQTT event entity wants a JSON object with "event_type"; the rest of the
# object becomes the event's attributes, so the whole webhook body is kept.
_EVENT_TEMPLATE: Final = (
    "{%- set b = value_json if value_json is defined and value_json is mapping else {} -%}"
    "{%- set c = b.content if b.content is mapping else {} -%}"
    "{%- set n = b.notifyType if b.notifyType is string else '' -%}"
    "{%- set s = c.smdpStatus if c.smdpStatus is string else '' -%}"
    f"{{%- set t = s if n == 'SMDP_EVENT' and s in {_jinja_list(SMDP_STATUSES)}"
    f" else (n if n in {_jinja_list(KNOWN_TYPES)} else '') -%}}"
    f"{{{{ dict(b, event_type=t) | to_json if t else '{_NONE}' }}}}"
)

