"""config/homeassistant/automations.yaml, run on the bridge's event topic as Home
Assistant runs an MQTT-triggered automation: the trigger's value_template must render
its `payload`, then the variables render in order, the template conditions must be
true, and the notification's message renders.

The templates render in Jinja's sandbox with StrictUndefined, which makes an undefined
variable an error where Home Assistant would log a warning for every message (a
DATA_USAGE body has no smdpStatus, for instance).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tests.processes import ROOT, fixture

AUTOMATIONS: dict[str, dict[str, Any]] = {
    a["id"]: a
    for a in yaml.safe_load(Path(ROOT / "config/homeassistant/automations.yaml").read_text())
}
ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
GIB = 1024**3


def render(template: str, **variables: Any) -> str:
    return ENV.from_string(template).render(variables).strip()


def notification(automation_id: str, body: bytes) -> str | None:
    """The message the automation sends for `body` on esim/<iccid>/event, or None."""
    automation = AUTOMATIONS[automation_id]
    value_json = json.loads(body)
    iccid = value_json["content"].get("iccid", "8943108170001029631")
    topic = f"esim/{iccid}/event"
    (trigger,) = automation["triggers"]
    assert (trigger["trigger"], trigger["topic"]) == ("mqtt", "esim/+/event")
    if render(trigger["value_template"], value=body.decode(), value_json=value_json) != (
        trigger["payload"]
    ):
        return None
    context: dict[str, Any] = {
        "trigger": {"topic": topic, "payload": body.decode(), "payload_json": value_json}
    }
    for name, template in automation.get("variables", {}).items():
        context[name] = render(template, **context)
    for condition in automation.get("conditions", []):
        assert condition["condition"] == "template"
        if render(condition["value_template"], **context) != "True":
            return None
    (action,) = automation["actions"]
    return render(action["data"]["message"], **context)


def data_usage(remain: int, total: int = 50 * GIB) -> bytes:
    body = json.loads(fixture("data_usage"))
    body["content"].update(remain=remain, totalVolume=total, orderUsage=total - remain)
    return json.dumps(body).encode()


def test_every_automation_is_listed() -> None:
    assert sorted(AUTOMATIONS) == ["esim_bridge_expiring", "esim_bridge_installed",
                                   "esim_bridge_low_data", "esim_bridge_used_up"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (fixture("data_usage"), "eSIM …9631: only 10.0 % of its data left."),
        # the provider's 20 % webhook: a little under 20 % left, 20.0 to one decimal
        (data_usage(int(50 * GIB * 0.1997)), "eSIM …9631: only 20.0 % of its data left."),
        (data_usage(int(50 * GIB * 0.2)), "eSIM …9631: only 20.0 % of its data left."),
        (data_usage(int(50 * GIB * 0.5)), None),
        (data_usage(0, total=0), None),  # no total: nothing to say
        (json.dumps({**json.loads(fixture("data_usage")), "content": {
            **json.loads(fixture("data_usage"))["content"], "remain": "5368709120",
            "totalVolume": "53687091200"}}).encode(), "eSIM …9631: only 10.0 % of its data left."),
    ],
)
def test_low_data(body: bytes, message: str | None) -> None:
    assert notification("esim_bridge_low_data", body) == message


def test_installed_fires_on_enabled_only_and_renders_for_every_webhook() -> None:
    enabled = json.loads(fixture("smdp_event"))
    enabled["content"]["smdpStatus"] = "ENABLED"
    message = notification("esim_bridge_installed", json.dumps(enabled).encode())
    assert message == ("eSIM …2199 is installed and enabled "
                       "(EID 89049032007108882600137544319616).")
    for name in ("smdp_event", "data_usage", "validity_usage", "esim_status"):
        assert notification("esim_bridge_installed", fixture(name)) is None, name


def test_expiring_and_used_up() -> None:
    assert notification("esim_bridge_expiring", fixture("validity_usage")) == (
        "eSIM …0003: 1 day of validity left, it expires 2024-01-11T08:10:19Z.")
    used_up = json.loads(fixture("esim_status"))
    used_up["content"]["esimStatus"] = "USED_UP"
    assert notification("esim_bridge_used_up", json.dumps(used_up).encode()) == (
        "eSIM …6720 has used up its data plan.")
    for name in ("data_usage", "smdp_event", "esim_status"):
        assert notification("esim_bridge_expiring", fixture(name)) is None, name
        assert notification("esim_bridge_used_up", fixture(name)) is None, name
