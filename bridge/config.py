"""The configuration: one TOML file, decoded by msgspec, overridable from the environment.

Every key has a default, so no file and no variables is a valid configuration.
Problems are collected, not raised one by one, so `check-config` can show
them all at once, each naming the key (or variable) it is about.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import SplitResult, urlsplit

import msgspec

PROVIDER_IPS = ["3.1.131.226", "54.254.74.88", "18.136.190.97", "18.136.60.197", "18.136.19.137"]
LOOPBACK = ["127.0.0.1", "::1"]
ENV_PREFIX = "ESIM_BRIDGE_"
TOPIC_LEVEL = re.compile(r"^[^#+/\x00]+(/[^#+/\x00]+)*$")

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Positive = Annotated[int, msgspec.Meta(gt=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class HttpConfig(_Section):
    host: str = "0.0.0.0"
    port: Port = 8080
    path: str = "/webhook"
    token: str | None = None
    allowed_ips: list[str] = msgspec.field(default_factory=lambda: [*PROVIDER_IPS, *LOOPBACK])
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    max_body_bytes: Positive = 65536
    body_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class MqttConfig(_Section):
    url: str | None = None
    embedded_listen: str = "127.0.0.1:1883"
    client_id: str = "esim-bridge"
    base_topic: str = "esim"
    qos: Annotated[int, msgspec.Meta(ge=0, le=2)] = 1
    keepalive: Annotated[int, msgspec.Meta(ge=5)] = 30
    shutdown_timeout: Annotated[float, msgspec.Meta(ge=0)] = 5.0


class HomeAssistantConfig(_Section):
    discovery: bool = True
    prefix: str = "homeassistant"
    forget_ended_days: Annotated[int, msgspec.Meta(ge=0)] = 30


PROVIDER_MAX_RPS = 8  # the provider's own limit, per account
MIN_USAGE_MINUTES = 15  # its usage figures lag 2-3 hours: polling more often gains nothing


class ProviderConfig(_Section):
    """The provider's REST API; without an access code it is never called."""

    access_code: str | None = None
    secret_key: str | None = None
    base_url: str = "https://api.esimaccess.com"
    sync_minutes: Positive = 360
    usage_minutes: int = 60
    max_rps: int = 5
    publish_activation: bool = False


class StoreConfig(_Section):
    path: str = "./data/esim-bridge.db"
    url: str | None = None  # postgresql://user:pass@host:port/db, instead of path
    dedup_hours: Annotated[float, msgspec.Meta(gt=0)] = 72.0
    max_outbox: Positive = 1_000_000
    synchronous: str = "full"


class LogConfig(_Section):
    level: str = "info"


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    homeassistant: HomeAssistantConfig = msgspec.field(default_factory=HomeAssistantConfig)
    provider: ProviderConfig = msgspec.field(default_factory=ProviderConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)


SECTIONS: dict[str, type[_Section]] = {
    "http": HttpConfig,
    "mqtt": MqttConfig,
    "homeassistant": HomeAssistantConfig,
    "provider": ProviderConfig,
    "store": StoreConfig,
    "log": LogConfig,
}
SECRET_KEYS = {("http", "token"), ("provider", "access_code"), ("provider", "secret_key")}
URL_KEYS = {("mqtt", "url"), ("store", "url")}  # shown with the password masked


class ConfigError(Exception):
    """One or more problems with the configuration; `problems` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _field_types(section: type[_Section]) -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(section)}


def _env_value(raw: str, field_type: Any) -> Any:
    """Environment values are strings; lists may be JSON arrays or comma-separated."""
    text = raw.strip()
    wants_list = "list[" in str(field_type)
    if wants_list:
        if text.startswith("["):
            return msgspec.json.decode(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    if text == "" and "None" in str(field_type):
        return None
    return text


def _read_file(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problems.append(f"config file {path} does not exist: create it or drop --config")
        return {}
    except OSError as exc:
        problems.append(f"config file {path} cannot be read: {exc.strerror}")
        return {}
    try:
        decoded = msgspec.toml.decode(data)
    except msgspec.DecodeError as exc:
        problems.append(f"config file {path} is not valid TOML: {exc}")
        return {}
    if not isinstance(decoded, dict):
        problems.append(f"config file {path} must be a TOML table")
        return {}
    return decoded


def _shown(section: str, key: str, value: Any) -> str:
    """A value as a problem message quotes it: secrets masked, as `render` does."""
    if (section, key) in SECRET_KEYS:
        return "'***'"
    if (section, key) in URL_KEYS and isinstance(value, str):
        return repr(mask_url(value))
    return repr(value)


def _collect(
    path: Path | None, environ: Mapping[str, str], problems: list[str]
) -> dict[str, dict[str, Any]]:
    """Merge file and environment into {section: {key: value}}, checking each key's type."""
    raw = _read_file(path, problems) if path is not None else {}
    merged: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section not in SECTIONS:
            problems.append(f"unknown section [{section}] (known: {', '.join(SECTIONS)})")
            continue
        if not isinstance(table, dict):
            problems.append(f"{section} must be a table ([{section}]), not {type(table).__name__}")
            continue
        types = _field_types(SECTIONS[section])
        for key, value in table.items():
            if key not in types:
                problems.append(
                    f"unknown key {section}.{key} (known in [{section}]: {', '.join(types)})"
                )
                continue
            try:
                converted = msgspec.convert(value, types[key], strict=True)
            except msgspec.ValidationError as exc:
                problems.append(f"{section}.{key} = {_shown(section, key, value)}: {exc}")
                continue
            merged.setdefault(section, {})[key] = converted

    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS:
            problems.append(f"{name}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
            continue
        types = _field_types(SECTIONS[section])
        if key not in types:
            problems.append(f"{name}: unknown key {section}.{key} (known: {', '.join(types)})")
            continue
        try:
            converted = msgspec.convert(_env_value(value, types[key]), types[key], strict=False)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            problems.append(f"{name}={_shown(section, key, value)} (key {section}.{key}): {exc}")
            continue
        merged.setdefault(section, {})[key] = converted
    return merged


def _check_values(config: Config, problems: list[str]) -> None:
    """Rules a type cannot express: addresses, URLs, topic names."""
    for key in ("allowed_ips", "trusted_proxies"):
        for entry in getattr(config.http, key):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                problems.append(f"http.{key}: {entry!r} is not an IP address or CIDR")
    if not config.http.path.startswith("/") or config.http.path.rstrip("/") == "":
        problems.append(f"http.path = {config.http.path!r}: must start with / and not be /")
    if config.mqtt.url is not None:
        _check_url("mqtt.url", config.mqtt.url, ("mqtt", "mqtts"),
                   "mqtt://[user:pass@]host[:port] or mqtts://...", problems)
    host, sep, port = config.mqtt.embedded_listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(
            f"mqtt.embedded_listen = {config.mqtt.embedded_listen!r}: expected host:port"
        )
    for key in ("base_topic",):
        value = getattr(config.mqtt, key)
        if not TOPIC_LEVEL.match(value):
            problems.append(f"mqtt.{key} = {value!r}: not a valid topic (no + # or empty levels)")
    if not TOPIC_LEVEL.match(config.homeassistant.prefix):
        problems.append(f"homeassistant.prefix = {config.homeassistant.prefix!r}: not a topic")
    _check_provider(config.provider, problems)
    if config.store.url is not None:
        _check_url("store.url", config.store.url, ("postgresql", "postgres"),
                   "postgresql://user:pass@host[:port]/database (PostgreSQL is the only "
                   "engine besides the SQLite file of store.path)", problems)
    if config.store.synchronous not in ("full", "normal"):
        problems.append(f"store.synchronous = {config.store.synchronous!r}: 'full' or 'normal'")
    if config.log.level.lower() not in ("debug", "info", "warning", "error"):
        problems.append(f"log.level = {config.log.level!r}: debug, info, warning or error")


def _check_provider(provider: ProviderConfig, problems: list[str]) -> None:
    for key in ("access_code", "secret_key"):
        if getattr(provider, key) is not None and not getattr(provider, key).strip():
            problems.append(f"provider.{key} is empty: set it, or leave it out")
    if provider.secret_key is not None and provider.access_code is None:
        problems.append("provider.secret_key is set but provider.access_code is not: set "
                        "the access code too (the provider is never called without it)")
    parts = _split(provider.base_url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"provider.base_url = {mask_url(provider.base_url)!r}: expected "
                        "https://host[:port], e.g. https://api.esimaccess.com")
    if provider.usage_minutes < MIN_USAGE_MINUTES:
        problems.append(f"provider.usage_minutes = {provider.usage_minutes}: at least "
                        f"{MIN_USAGE_MINUTES} (the provider's usage figures lag 2-3 hours, "
                        "so reading them more often gains nothing)")
    if provider.max_rps <= 0:
        problems.append(f"provider.max_rps = {provider.max_rps}: must be at least 1")
    elif provider.max_rps > PROVIDER_MAX_RPS:
        problems.append(f"provider.max_rps = {provider.max_rps}: the provider allows "
                        f"{PROVIDER_MAX_RPS} requests per second per account; set at most "
                        f"{PROVIDER_MAX_RPS} (the default 5 leaves room for other clients)")


def load(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The effective configuration, or ConfigError listing every problem."""
    problems: list[str] = []
    merged = _collect(path, os.environ if environ is None else environ, problems)
    # a key with a wrong type is left out of `merged` (its default stands in), so that the
    # values of all the others are checked too: every problem is reported at once
    config = msgspec.convert(merged, Config)
    _check_values(config, problems)
    if problems:
        raise ConfigError(problems)
    return config


def _check_url(
    key: str, url: str, schemes: tuple[str, ...], expected: str, problems: list[str]
) -> None:
    """A URL of one of `schemes` with a host and a valid port, or a problem naming `key`
    (the password masked)."""
    parts = _split(url)
    if parts is None or parts.scheme not in schemes or not parts.hostname:
        problems.append(f"{key} = {mask_url(url)!r}: expected {expected}")
        return
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        problems.append(f"{key} = {mask_url(url)!r}: the port is not valid")


def _split(url: str) -> SplitResult | None:
    try:
        return urlsplit(url)
    except ValueError:  # an unclosed [ or a bad IPv6 host
        return None


def mask_url(url: str) -> str:
    """The URL with its password replaced, safe to print."""
    parts = _split(url)
    if parts is None:  # not parsable: hide everything before the last @
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return msgspec.json.encode(str(value)).decode()


def render(config: Config) -> str:
    """The configuration as TOML, secrets masked, unset keys as comments."""
    lines: list[str] = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        values = msgspec.structs.asdict(getattr(config, section))
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} is not set")
                continue
            if (section, key) in SECRET_KEYS:
                value = "***"
            elif (section, key) in URL_KEYS:
                value = mask_url(value)
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
