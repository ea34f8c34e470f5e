"""The templates of our discovery configs, rendered as Home Assistant renders them.

Home Assistant's MQTT entities render `value_template` in a sandboxed Jinja environment
with `value` (the payload as text) and, when the payload is JSON, `value_json`; it adds
filters of its own, of which ours use `to_json`. A sensor whose template renders "None"
shows *unknown*; an event entity wants a JSON object whose `event_type` is one of its
`event_types`, and ignores "None". These tests render the templates the bridge actually
publishes with Jinja itself, on the payloads the bridge publishes and on payloads it
never would (a value the provider may add one day, a broken body), so that "a value
outside the known list shows as unknown, it never breaks the entity" is checked by
running the template, not by reading it.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bridge.homeassistant import (
    ESIM_STATUSES,
    PROVIDER_STATES,
    SMDP_STATUSES,
    bridge_discovery,
    esim_discovery,
)
from tests.processes import fixture

ENV = ImmutableSandboxedEnvironment()
ENV.filters["to_json"] = lambda value: json.dumps(value, ensure_ascii=False)

ESIM = json.loads(
    esim_discovery("8943108170001029631", {}, base="esim", prefix="homeassistant", version="0")[1]
)["cmps"]
BRIDGE = json.loads(bridge_discovery(base="esim", prefix="homeassistant", version="0")[1])["cmps"]
WITH_PROVIDER = json.loads(
    bridge_discovery(base="esim", prefix="homeassistant", version="0", provider=True)[1]
)["cmps"]
WITH_REPLICAS = json.loads(
    bridge_discovery(base="esim", prefix="homeassistant", version="0", replicas=True)[1]
)["cmps"]


def render(template: str, payload: bytes) -> str:
    """What Home Assistant's MQTT entity gets from `template` for `payload`."""
    text = payload.decode()
    variables: dict[str, Any] = {"value": text}
    with contextlib.suppress(ValueError):  # not JSON: value_json stays undefined
        variables["value_json"] = json.loads(text)
    return ENV.from_string(template).render(variables).strip()


@pytest.mark.parametrize(("key", "known"), [("status", ESIM_STATUSES),
                                            ("smdp_status", SMDP_STATUSES)])
def test_enum_sensors_pass_known_values_and_make_the_rest_unknown(
    key: str, known: tuple[str, ...]
) -> None:
    template = ESIM[key]["value_template"]
    assert ESIM[key]["options"] == list(known)
    for value in known:
        assert render(template, value.encode()) == value
    for value in ("SOMETHING_NEW", "in_use", "", "IN_USE ", '{"a": 1}', "None"):
        assert render(template, value.encode()) == "None", value


@pytest.mark.parametrize(
    ("name", "event_type"),
    [
        ("smdp_event", "DOWNLOAD"),  # an SMDP_EVENT fires as its smdpStatus
        ("esim_status", "ESIM_STATUS"),
        ("data_usage", "DATA_USAGE"),
        ("validity_usage", "VALIDITY_USAGE"),
    ],
)
def test_the_event_entity_fires_on_every_webhook_with_the_body_as_attributes(
    name: str, event_type: str
) -> None:
    component = ESIM["last_event"]
    body = fixture(name)  # what esim/<iccid>/event carries: the body as received
    event = json.loads(render(component["value_template"], body))
    assert event["event_type"] == event_type
    assert event_type in component["event_types"]
    assert {k: v for k, v in event.items() if k != "event_type"} == json.loads(body)


def test_an_smdp_status_the_provider_adds_later_still_fires_as_the_notify_type() -> None:
    body = json.loads(fixture("smdp_event"))
    body["content"]["smdpStatus"] = "SUSPENDED"
    event = json.loads(render(ESIM["last_event"]["value_template"], json.dumps(body).encode()))
    assert event["event_type"] == "SMDP_EVENT"


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1, 2]", b"7", b"{}", b'{"notifyType": 5}', b'{"notifyType": "NEW_TYPE"}',
     b'{"notifyType": ["SMDP_EVENT"], "content": {"smdpStatus": "ENABLED"}}'],
)
def test_the_event_entity_ignores_what_it_cannot_name(payload: bytes) -> None:
    assert render(ESIM["last_event"]["value_template"], payload) == "None"


def test_the_order_number_comes_from_the_state_json() -> None:
    template = ESIM["order_no"]["value_template"]
    assert render(template, b'{"iccid": "1", "order_no": "B25052822150009"}') == "B25052822150009"
    for payload in (b'{"iccid": "1"}', b'{"order_no": null}', b"[1]", b"garbage"):
        assert render(template, payload) == "None", payload


@pytest.mark.parametrize("key", ["webhooks_received", "outbox_backlog"])
def test_bridge_counters_come_from_bridge_info(key: str) -> None:
    template = BRIDGE[key]["value_template"]
    info = {"version": "0", "started_at": "x", "counts": {key: 12}}
    assert render(template, json.dumps(info).encode()) == "12"
    as_text = json.dumps({"counts": {key: "12"}}).encode()
    for payload in (b'{"counts": {}}', b'{"counts": 3}', as_text, b"garbage"):
        assert render(template, payload) == "None", payload


def test_the_publishing_replica_comes_from_bridge_info() -> None:
    template = WITH_REPLICAS["publisher"]["value_template"]
    assert WITH_REPLICAS["publisher"]["state_topic"] == "esim/bridge/info"
    info = {"version": "0", "publisher": "bridge-2:4181", "counts": {}}
    assert render(template, json.dumps(info).encode()) == "bridge-2:4181"
    for payload in (b'{"counts": {}}', b'{"publisher": null}', b"garbage"):
        assert render(template, payload) == "None", payload
    assert "publisher" not in BRIDGE and "publisher" not in WITH_PROVIDER


def test_the_provider_state_passes_its_four_values_and_makes_the_rest_unknown() -> None:
    template = WITH_PROVIDER["provider"]["value_template"]
    assert WITH_PROVIDER["provider"]["options"] == list(PROVIDER_STATES)
    for value in ("ok", "unauthorized", "unreachable", "error"):
        assert render(template, value.encode()) == value
    for value in ("OK", "rate_limited", "", "ok ", "None", '{"state": "ok"}'):
        assert render(template, value.encode()) == "None", value


def test_the_other_provider_entities_take_their_payload_as_it_is() -> None:
    """Balance, last sync, package and activation time: plain values, no template."""
    esim = json.loads(
        esim_discovery(
            "8943108170001029631", {}, base="esim", prefix="homeassistant", version="0",
            provider=True,
        )[1]
    )["cmps"]
    for comp in (WITH_PROVIDER["balance"], WITH_PROVIDER["last_sync"], esim["package"],
                 esim["activated_at"]):
        assert "value_template" not in comp
