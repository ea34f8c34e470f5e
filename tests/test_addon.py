"""The Home Assistant add-on (esim_bridge/) and its repository file, checked against the
rules the Supervisor applies when it reads them, and its start script's mapping of
options to the bridge's configuration.

The Supervisor is too big to install for a test, so its rules are restated here, each
next to the source it comes from (home-assistant/supervisor, paths relative to
``supervisor/``; add-ons are called "apps" there since 2026):

- ``apps/validate.py``: ``_SCHEMA_APP_CONFIG`` (the keys of ``config.yaml``, which are
  required, their types; unknown keys are dropped silently, ``extra=vol.REMOVE_EXTRA``,
  so a misspelt key would vanish), ``RE_SERVICE``, ``RE_VOLUME``, ``SCHEMA_ELEMENT``,
  ``SCHEMA_APP_TRANSLATIONS`` and ``SCHEMA_TRANSLATION_CONFIGURATION``.
- ``apps/options.py``: ``RE_SCHEMA_ELEMENT`` (the option types), ``AppOptions`` (how
  the options are validated against the schema; options missing from ``options`` must
  be optional, ``?``).
- ``apps/const.py``: ``RE_SLUG``, ``MappingType``.
- ``apps/build.py``: ``BUILD_FROM`` is passed only with a (deprecated) ``build.yaml``,
  so the Dockerfile names its own default base; ``BUILD_VERSION`` and ``BUILD_ARCH`` are
  always passed.
- ``validate.py``: ``docker_ports``, ``docker_ports_description``, ``network_port``.
- ``const.py``: ``ARCH_ALL`` (``aarch64``, ``amd64``; the others are deprecated),
  ``AppStartup``, ``AppBootConfig``, ``AppStage``, ``ROLE_ALL``,
  ``FILE_SUFFIX_CONFIGURATION``.
- ``store/validate.py``: ``SCHEMA_REPOSITORY_CONFIG`` (``repository.yaml``);
  ``store/data.py``: ``_find_app_configs`` (every ``config.{yaml,yml,json}`` in the
  repository, outside folders starting with ``.`` and ``rootfs``, is read as an add-on).
- ``api/services.py`` and ``services/modules/mqtt.py``: ``GET /services/mqtt`` answers
  ``{"result": "ok", "data": {host, port, username, password, ssl, protocol, ...}}``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bridge import config as bridge_config
from bridge.publisher import BrokerAddress

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "esim_bridge"

# config.yaml keys the Supervisor knows (apps/validate.py, _SCHEMA_APP_CONFIG)
KNOWN_KEYS = {
    "name", "version", "slug", "description", "arch", "machine", "url", "startup", "boot",
    "init", "advanced", "stage", "ports", "ports_description", "watchdog", "webui",
    "ingress", "ingress_port", "ingress_entry", "ingress_stream", "panel_icon",
    "panel_title", "panel_admin", "homeassistant", "host_network", "host_pid", "host_ipc",
    "host_uts", "host_dbus", "devices", "udev", "tmpfs", "map", "environment", "privileged",
    "apparmor", "full_access", "audio", "video", "gpio", "usb", "uart", "devicetree",
    "kernel_modules", "realtime", "hassio_api", "hassio_role", "homeassistant_api", "stdin",
    "legacy", "docker_api", "auth_api", "services", "discovery", "backup_exclude",
    "backup_pre", "backup_post", "backup", "options", "schema", "image", "ulimits",
    "timeout", "journald", "breaking_versions",
}
REQUIRED_KEYS = {"name", "version", "slug", "description", "arch"}
BOOLEAN_KEYS = {
    "init", "ingress", "ingress_stream", "panel_admin", "host_network", "host_pid",
    "host_ipc", "host_uts", "host_dbus", "udev", "tmpfs", "apparmor", "full_access",
    "audio", "video", "gpio", "usb", "uart", "devicetree", "kernel_modules", "realtime",
    "hassio_api", "homeassistant_api", "stdin", "legacy", "docker_api", "auth_api",
    "journald",
}
ARCHITECTURES = {"aarch64", "amd64"}  # const.py ARCH_ALL; armhf, armv7, i386 deprecated
STARTUP = {"initialize", "system", "services", "application", "once"}
BOOT = {"auto", "manual", "manual_only"}
STAGE = {"stable", "experimental", "deprecated"}
SLUG = re.compile(r"[-_.A-Za-z0-9]+")
PORT_KEY = re.compile(r"\d+(/tcp|/udp)?")
WATCHDOG = re.compile(r"(https?|\[PROTO:\w+\]|tcp)://\[HOST\]:(\[PORT:\d+\]|\d+).*")
SERVICE = re.compile(r"(mqtt|mysql):(provide|want|need)")
# an option's type: name, optional "(arguments)", optional "?" (apps/options.py)
OPTION_TYPE = re.compile(r"(?P<name>[a-z]+)(\((?P<args>.*)\))?(?P<optional>\?)?")
OPTION_NAMES = {"bool", "email", "url", "port", "device", "str", "password", "int", "float",
                "match", "list"}
NUMBER = r"-?\d*\.?\d+"


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    data = read_yaml(ADDON / "config.yaml")
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def start() -> ModuleType:
    """esim_bridge/run.py, imported as a module (it runs nothing on import)."""
    spec = importlib.util.spec_from_file_location("addon_run", ADDON / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_type(text: str) -> tuple[str, str | None, bool]:
    """An option type as (name, arguments, optional), or AssertionError naming it."""
    match = OPTION_TYPE.fullmatch(text)
    assert match and match["name"] in OPTION_NAMES, f"unknown option type {text!r}"
    name, args = match["name"], match["args"]
    if name in ("str", "password", "int", "float") and args is not None:
        number = r"\d+" if name in ("str", "password") else NUMBER
        assert re.fullmatch(rf"({number})?,({number})?", args), f"bad range in {text!r}"
    if name in ("match", "list"):
        assert args, f"{text!r} needs its argument"
    if name == "device" and args is not None:
        assert re.fullmatch(r"subsystem=[a-z]+", args), f"bad filter in {text!r}"
    if name not in ("str", "password", "int", "float", "match", "list", "device"):
        assert args is None, f"{text!r} takes no argument"
    return name, args, match["optional"] is not None


def check_value(kind: str, value: Any, key: str) -> None:
    """A value as AppOptions._single_validate would accept it."""
    name, args, _ = parse_type(kind)
    low, high = (args.split(",") if args and name in ("str", "password", "int", "float")
                 else ("", ""))
    if name in ("str", "password"):
        assert isinstance(value, str), f"{key}: {value!r} is not a string"
        assert not low or len(value) >= int(low), f"{key}: shorter than {low}"
        assert not high or len(value) <= int(high), f"{key}: longer than {high}"
    elif name in ("int", "float"):
        number = (int if name == "int" else float)(value)
        assert not low or number >= float(low), f"{key}: below {low}"
        assert not high or number <= float(high), f"{key}: above {high}"
    elif name == "bool":
        assert isinstance(value, bool), f"{key}: {value!r} is not a boolean"
    elif name == "port":
        assert 1 <= int(value) <= 65535, f"{key}: {value!r} is not a port"
    elif name == "match":
        assert args is not None and re.match(args, str(value)), f"{key}: {value!r} !~ {args}"
    elif name == "list":
        assert args is not None and str(value) in args.split("|"), f"{key}: {value!r}"
    elif name == "url":
        assert urlsplit(str(value)).scheme and urlsplit(str(value)).netloc, key


def check_options(schema: dict[str, Any], options: dict[str, Any], where: str) -> None:
    """AppOptions: every option has a type and fits it; a missing one must be optional."""
    for key, value in options.items():
        assert key in schema, f"option {where}{key} is not in the schema (it would be dropped)"
        kind = schema[key]
        if isinstance(kind, list):
            assert isinstance(value, list), f"{where}{key} must be a list"
            for item in value:
                if isinstance(kind[0], dict):
                    check_options(kind[0], item, f"{where}{key}[].")
                else:
                    check_value(kind[0], item, f"{where}{key}[]")
        elif isinstance(kind, dict):
            check_options(kind, value, f"{where}{key}.")
        else:
            check_value(kind, value, f"{where}{key}")
    for key in set(schema) - set(options):
        kind = schema[key]
        if isinstance(kind, list):
            kind = kind[0]
        assert isinstance(kind, str) and kind.endswith("?"), (
            f"option {where}{key} has no default and is not optional (`?`): the Supervisor "
            "would refuse to start the add-on"
        )


def walk_schema(schema: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(key, type) of every leaf; lists hold one element, not a list (SCHEMA_ELEMENT)."""
    for key, kind in schema.items():
        if isinstance(kind, list):
            assert len(kind) == 1 and not isinstance(kind[0], list), f"{where}{key}"
            kind = kind[0]
        if isinstance(kind, dict):
            yield from walk_schema(kind, f"{where}{key}.")
        else:
            assert isinstance(kind, str), f"{where}{key}: {kind!r}"
            yield f"{where}{key}", kind


def test_the_manifest_has_only_keys_the_supervisor_knows(manifest: dict[str, Any]) -> None:
    assert set(manifest) <= KNOWN_KEYS, set(manifest) - KNOWN_KEYS
    assert set(manifest) >= REQUIRED_KEYS
    for key in ("name", "description", "slug"):
        assert isinstance(manifest[key], str) and manifest[key]
    assert SLUG.fullmatch(manifest["slug"])
    assert isinstance(manifest["version"], str), "quote the version: 0.10 is not 0.1"
    for key in BOOLEAN_KEYS & set(manifest):
        assert isinstance(manifest[key], bool), key


def test_the_manifest_values_fit_the_supervisor_schema(manifest: dict[str, Any]) -> None:
    assert manifest["arch"] and set(manifest["arch"]) <= ARCHITECTURES
    assert manifest.get("startup", "application") in STARTUP
    assert manifest.get("boot", "auto") in BOOT
    assert manifest.get("stage", "stable") in STAGE
    assert 10 <= int(manifest.get("timeout", 10)) <= 300
    for port, host_port in manifest.get("ports", {}).items():
        assert PORT_KEY.fullmatch(str(port)), port
        assert host_port is None or 1 <= int(host_port) <= 65535, port
    assert set(manifest.get("ports_description", {})) <= set(manifest.get("ports", {}))
    assert all(isinstance(v, str) for v in manifest.get("ports_description", {}).values())
    if "watchdog" in manifest:
        assert WATCHDOG.fullmatch(manifest["watchdog"]), manifest["watchdog"]
    for service in manifest.get("services", []):
        assert SERVICE.fullmatch(service), service
    if "url" in manifest:
        assert urlsplit(manifest["url"]).scheme in ("http", "https")


def test_the_add_on_publishes_the_webhook_port_and_needs_mqtt(manifest: dict[str, Any]) -> None:
    assert manifest["ports"] == {"8080/tcp": 8080}
    assert "mqtt:need" in manifest["services"]
    assert manifest["watchdog"] == "http://[HOST]:[PORT:8080]/healthz"
    assert manifest["timeout"] >= 15, "mqtt.shutdown_timeout (5 s) and the HTTP drain"


def test_the_options_fit_their_schema(manifest: dict[str, Any]) -> None:
    schema, options = manifest["schema"], manifest["options"]
    for _, kind in walk_schema(schema):
        parse_type(kind)
    check_options(schema, options, "")


def test_secrets_are_password_fields(manifest: dict[str, Any]) -> None:
    schema = manifest["schema"]
    for key in ("webhook_token", "mqtt_password", "provider_access_code",
                "provider_secret_key"):
        assert parse_type(schema[key])[0] == "password", key


def test_every_option_is_translated(manifest: dict[str, Any]) -> None:
    """SCHEMA_APP_TRANSLATIONS: configuration.<option>.name (and description), network."""
    translations = read_yaml(ADDON / "translations" / "en.yaml")
    assert set(translations) <= {"configuration", "network"}
    configuration = translations["configuration"]
    assert set(configuration) == set(manifest["schema"])
    for key, text in configuration.items():
        assert isinstance(text.get("name"), str) and text["name"], key
        assert set(text) <= {"name", "description", "fields"}, key
        assert text.get("description") is None or isinstance(text["description"], str), key
    assert set(translations["network"]) == set(manifest["ports"])


def test_the_repository_file() -> None:
    """store/validate.py SCHEMA_REPOSITORY_CONFIG: name required, url a URL."""
    repository = read_yaml(ROOT / "repository.yaml")
    assert set(repository) <= {"name", "url", "maintainer"}
    assert isinstance(repository["name"], str) and repository["name"]
    assert urlsplit(repository["url"]).scheme == "https"
    assert isinstance(repository.get("maintainer", ""), str)


def test_the_store_finds_exactly_one_add_on() -> None:
    """store/data.py reads every config.{yaml,yml,json} of the repository as an add-on."""
    try:
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    found = [
        path for path in tracked
        if re.fullmatch(r"config\.(yaml|yml|json)", Path(path).name)
        and not any(part.startswith(".") or part == "rootfs" for part in Path(path).parts)
    ]
    assert found == ["esim_bridge/config.yaml"]


def test_the_dockerfile_names_its_base_and_installs_this_version(
    manifest: dict[str, Any],
) -> None:
    assert not list(ADDON.glob("build.*")), "build.yaml is deprecated (apps/build.py)"
    dockerfile = (ADDON / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG BUILD_FROM=(\S+)$", dockerfile, re.M)
    assert base and base.group(1).startswith("ghcr.io/home-assistant/")
    assert re.search(r"^FROM \$\{BUILD_FROM\}$", dockerfile, re.M)
    assert dockerfile.index("ARG BUILD_FROM") < dockerfile.index("FROM ${BUILD_FROM}")
    version = re.search(r"^ARG BUILD_VERSION=(\S+)$", dockerfile, re.M)
    assert version and version.group(1) == manifest["version"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert manifest["version"] == pyproject["project"]["version"]
    changelog = (ADDON / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {manifest['version']}" in changelog


def test_the_icon_is_a_square_png() -> None:
    data = (ADDON / "icon.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width == height == 128


def test_every_option_reaches_the_bridge(manifest: dict[str, Any], start: ModuleType) -> None:
    """No option is silently ignored, and each variable names a key the bridge has."""
    handled = set(start.VARIABLES) | set(start.MQTT_OPTIONS)
    assert set(manifest["schema"]) == handled
    for variable in start.VARIABLES.values():
        section, _, key = variable.removeprefix("ESIM_BRIDGE_").lower().partition("_")
        if section == "provider" and section not in bridge_config.SECTIONS:
            continue  # the provider's section arrives with the provider issue
        assert section in bridge_config.SECTIONS, variable
        fields = {f.name for f in bridge_config.msgspec.structs.fields(
            bridge_config.SECTIONS[section])}
        assert key in fields, variable


def test_the_default_options_are_the_bridge_defaults(
    manifest: dict[str, Any], start: ModuleType
) -> None:
    environment = start.bridge_environment(manifest["options"])
    environment["ESIM_BRIDGE_MQTT_URL"] = start.broker_url("core-mosquitto", 1883, "addons",
                                                           "p@ss:w/rd", False)
    settings = bridge_config.load(environ=environment)
    assert settings.http.token is None  # the empty token is left unset
    assert settings.http.allowed_ips == bridge_config.PROVIDER_IPS
    assert settings.store.path == "/data/esim-bridge.db"
    assert settings.mqtt.base_topic == "esim"
    assert settings.homeassistant.discovery is True
    assert settings.log.level == "info"


def test_set_options_become_the_bridge_configuration(start: ModuleType) -> None:
    options = {
        "webhook_token": "s3cret", "allowed_ips": [], "trusted_proxies": ["172.30.32.0/23"],
        "base_topic": "esim2", "client_id": "ha-esim", "discovery": False,
        "discovery_prefix": "ha", "dedup_hours": 12.5, "log_level": "debug",
    }
    environment = start.bridge_environment(options)
    settings = bridge_config.load(environ=environment)
    assert settings.http.token == "s3cret"
    assert settings.http.allowed_ips == []  # an emptied list allows everyone
    assert settings.http.trusted_proxies == ["172.30.32.0/23"]
    assert (settings.mqtt.base_topic, settings.mqtt.client_id) == ("esim2", "ha-esim")
    assert settings.homeassistant.discovery is False
    assert settings.homeassistant.prefix == "ha"
    assert settings.store.dedup_hours == 12.5
    assert settings.log.level == "debug"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"mqtt_host": "broker.lan"}, BrokerAddress("broker.lan", 1883)),
        ({"mqtt_host": "broker.lan", "mqtt_tls": True}, BrokerAddress("broker.lan", 8883, True)),
        (
            {"mqtt_host": "fd00::1", "mqtt_port": 1884, "mqtt_username": "me@home",
             "mqtt_password": "p@ss:w/rd%"},
            BrokerAddress("fd00::1", 1884, False, "me@home", "p@ss:w/rd%"),
        ),
    ],
)
def test_a_broker_in_the_options_wins(
    start: ModuleType, options: dict[str, Any], expected: BrokerAddress
) -> None:
    def no_supervisor() -> dict[str, Any]:
        raise AssertionError("the Supervisor was asked although the options name a broker")

    url, origin = start.mqtt_url(options, no_supervisor)
    assert BrokerAddress.parse(url) == expected
    assert "options" in origin and "p@ss" not in origin
    assert bridge_config.load(environ={"ESIM_BRIDGE_MQTT_URL": url}).mqtt.url == url


class StandIn(BaseHTTPRequestHandler):
    """The Supervisor's GET /services/mqtt, as api/services.py answers it."""

    token = "a" * 64
    answer: tuple[int, dict[str, Any]] = (200, {})

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            status, body = 401, {"result": "error", "message": "Invalid token"}
        elif self.path != "/services/mqtt":
            status, body = 404, {"result": "error", "message": "not found"}
        else:
            status, body = self.answer
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def supervisor() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        StandIn.answer = (200, {})


def test_the_broker_comes_from_the_supervisor(start: ModuleType, supervisor: str) -> None:
    StandIn.answer = (200, {"result": "ok", "data": {
        "host": "core-mosquitto", "port": 1883, "ssl": False, "protocol": "3.1.1",
        "username": "addons", "password": "Ai5r:/@x", "addon": "core_mosquitto",
    }})
    url, origin = start.mqtt_url(
        {}, lambda: start.supervisor_mqtt_service(supervisor, StandIn.token)
    )
    assert BrokerAddress.parse(url) == BrokerAddress(
        "core-mosquitto", 1883, False, "addons", "Ai5r:/@x"
    )
    assert "Supervisor" in origin and "Ai5r" not in origin


def test_no_mqtt_service_says_what_to_do(start: ModuleType, supervisor: str) -> None:
    StandIn.answer = (400, {"result": "error", "message": "Service not enabled"})
    with pytest.raises(start.StartError, match="Mosquitto broker add-on"):
        start.supervisor_mqtt_service(supervisor, StandIn.token)
    with pytest.raises(start.StartError, match="SUPERVISOR_TOKEN"):
        start.supervisor_mqtt_service(supervisor, None)
    with pytest.raises(start.StartError, match="cannot reach the Supervisor"):
        start.supervisor_mqtt_service("http://127.0.0.1:9", StandIn.token, attempts=1)


def test_the_start_script_runs_on_the_standard_library_alone() -> None:
    """It starts before the bridge is known to work: no import of the bridge, no
    third-party module, and it compiles with the oldest Python the bridge supports."""
    source = (ADDON / "run.py").read_text(encoding="utf-8")
    imported = set(re.findall(r"^(?:from|import) ([a-z_.]+)", source, re.M))
    imported = {name.split(".")[0] for name in imported} - {"__future__"}
    assert imported <= set(sys.stdlib_module_names), imported
