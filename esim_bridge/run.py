"""Start esim-bridge as a Home Assistant add-on.

The Supervisor writes the add-on's options to /data/options.json and gives the
container a SUPERVISOR_TOKEN. This turns the options into the bridge's ESIM_BRIDGE_*
variables, takes the MQTT broker from the Supervisor's MQTT service (the Mosquitto
add-on) unless the options name one, keeps the store on /data, and then becomes
`esim-bridge serve`. Standard library only: it runs before anything else is known.

SUPERVISOR_URL (default http://supervisor) lets a test stand in for the Supervisor.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

OPTIONS_FILE = "/data/options.json"
STORE_PATH = "/data/esim-bridge.db"
BRIDGE = "/opt/esim-bridge/bin/esim-bridge"

# option -> the bridge's variable (bridge/config.py); lists go as JSON arrays
VARIABLES = {
    "webhook_token": "ESIM_BRIDGE_HTTP_TOKEN",
    "allowed_ips": "ESIM_BRIDGE_HTTP_ALLOWED_IPS",
    "trusted_proxies": "ESIM_BRIDGE_HTTP_TRUSTED_PROXIES",
    "base_topic": "ESIM_BRIDGE_MQTT_BASE_TOPIC",
    "client_id": "ESIM_BRIDGE_MQTT_CLIENT_ID",
    "discovery": "ESIM_BRIDGE_HOMEASSISTANT_DISCOVERY",
    "discovery_prefix": "ESIM_BRIDGE_HOMEASSISTANT_PREFIX",
    "dedup_hours": "ESIM_BRIDGE_STORE_DEDUP_HOURS",
    "log_level": "ESIM_BRIDGE_LOG_LEVEL",
    "provider_access_code": "ESIM_BRIDGE_PROVIDER_ACCESS_CODE",
    "provider_secret_key": "ESIM_BRIDGE_PROVIDER_SECRET_KEY",
}
# options that make up ESIM_BRIDGE_MQTT_URL
MQTT_OPTIONS = ("mqtt_host", "mqtt_port", "mqtt_username", "mqtt_password", "mqtt_tls")


class StartError(Exception):
    """Something the user can fix; the message says what."""


def log(message: str) -> None:
    print(f"esim-bridge add-on: {message}", file=sys.stderr, flush=True)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps([str(item) for item in value])
    return str(value)


def bridge_environment(options: dict[str, Any]) -> dict[str, str]:
    """The ESIM_BRIDGE_* variables for these options; an empty text is not set."""
    environment = {"ESIM_BRIDGE_STORE_PATH": STORE_PATH}
    for option, variable in VARIABLES.items():
        value = options.get(option)
        if value is None or value == "":
            continue
        environment[variable] = _value(value)
    return environment


def broker_url(
    host: str, port: int, username: str | None, password: str | None, tls: bool
) -> str:
    """mqtt[s]://user:pass@host:port, the credentials percent-encoded (the bridge
    decodes them)."""
    credentials = ""
    if username:
        credentials = quote(username, safe="")
        if password:
            credentials += ":" + quote(password, safe="")
        credentials += "@"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'mqtts' if tls else 'mqtt'}://{credentials}{host}:{int(port)}"


def mqtt_url(options: dict[str, Any], service: Callable[[], dict[str, Any]]) -> tuple[str, str]:
    """The broker's URL, and where it came from: the options when they name a host,
    else the Supervisor's MQTT service."""
    host = options.get("mqtt_host")
    if host:
        tls = bool(options.get("mqtt_tls", False))
        port = int(options.get("mqtt_port") or (8883 if tls else 1883))
        url = broker_url(host, port, options.get("mqtt_username"),
                         options.get("mqtt_password"), tls)
        return url, f"{host}:{port}, from the add-on's options"
    data = service()
    try:
        host, port = str(data["host"]), int(data["port"])
    except (KeyError, TypeError, ValueError):
        raise StartError(
            f"the Supervisor's MQTT service gave no host and port: {sorted(data)}"
        ) from None
    url = broker_url(host, port, data.get("username"), data.get("password"),
                     bool(data.get("ssl", False)))
    user = f", user {data['username']}" if data.get("username") else ""
    return url, f"{host}:{port}, from the Supervisor's MQTT service{user}"


def supervisor_mqtt_service(
    base_url: str, token: str | None, attempts: int = 5, pause: float = 2.0
) -> dict[str, Any]:
    """GET /services/mqtt from the Supervisor: {"result": "ok", "data": {host, port, ...}}."""
    if not token:
        raise StartError("SUPERVISOR_TOKEN is not set: is this running as a Home Assistant "
                         "add-on? Elsewhere, set the add-on's mqtt_host option.")
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/services/mqtt", headers={"Authorization": f"Bearer {token}"}
    )
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.load(response)
            break
        except urllib.error.HTTPError as exc:
            try:
                message = json.load(exc).get("message", "")
            except (ValueError, AttributeError):
                message = ""
            raise StartError(
                f"the Supervisor has no MQTT service for this add-on (HTTP {exc.code} "
                f"{message}). Install and start the Mosquitto broker add-on, or set "
                "mqtt_host (and mqtt_username, mqtt_password) in this add-on's options."
            ) from None
        except (OSError, ValueError) as exc:
            if attempt == attempts:
                raise StartError(f"cannot reach the Supervisor at {base_url}: {exc}") from None
            time.sleep(pause)
    if not isinstance(answer, dict) or answer.get("result") != "ok":
        raise StartError(f"the Supervisor answered /services/mqtt with {answer!r}")
    data = answer.get("data")
    if not isinstance(data, dict):
        raise StartError("the Supervisor's MQTT service has no data")
    return data


def main() -> int:
    try:
        with open(OPTIONS_FILE, encoding="utf-8") as handle:
            options = json.load(handle)
    except FileNotFoundError:
        log(f"{OPTIONS_FILE} is missing: using the defaults")
        options = {}
    except ValueError as exc:
        log(f"{OPTIONS_FILE} is not valid JSON: {exc}")
        return 2
    environment = bridge_environment(options)
    base_url = os.environ.get("SUPERVISOR_URL", "http://supervisor")
    try:
        url, origin = mqtt_url(
            options,
            lambda: supervisor_mqtt_service(base_url, os.environ.get("SUPERVISOR_TOKEN")),
        )
    except StartError as exc:
        log(str(exc))
        return 1
    environment["ESIM_BRIDGE_MQTT_URL"] = url
    log(f"MQTT broker {origin}")
    os.environ.update(environment)
    os.execv(BRIDGE, [BRIDGE, "serve"])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
