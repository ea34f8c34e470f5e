"""Configuration: defaults, TOML, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge import config
from bridge.config import PROVIDER_IPS, ConfigError, load, render

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def problems(path: Path | None = None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path, env or {})
    return caught.value.problems


def test_nothing_is_a_valid_configuration() -> None:
    settings = load(None, {})
    assert settings.http.port == 8080
    assert settings.http.path == "/webhook"
    assert settings.http.token is None
    assert settings.http.allowed_ips == [*PROVIDER_IPS, "127.0.0.1", "::1"]
    assert settings.http.trusted_proxies == []
    assert settings.http.max_body_bytes == 65536
    assert settings.mqtt.url is None
    assert settings.mqtt.embedded_listen == "127.0.0.1:1883"
    assert (settings.mqtt.client_id, settings.mqtt.base_topic, settings.mqtt.qos) == (
        "esim-bridge", "esim", 1)
    assert settings.homeassistant.discovery is True
    assert settings.homeassistant.prefix == "homeassistant"
    assert settings.store.path == "./data/esim-bridge.db"
    assert settings.store.dedup_hours == 72


def test_the_example_file_is_valid_and_matches_the_defaults() -> None:
    example = load(ROOT / "config" / "esim-bridge.example.toml", {})
    assert example == load(None, {})


def test_file_values(tmp_path: Path) -> None:
    path = write(tmp_path, '[http]\nport = 9000\ntoken = "s3"\nallowed_ips = []\n'
                           '[mqtt]\nurl = "mqtt://u:p@broker:1884"\nbase_topic = "esim2"\n')
    settings = load(path, {})
    assert settings.http.port == 9000
    assert settings.http.token == "s3"
    assert settings.http.allowed_ips == []
    assert settings.mqtt.url == "mqtt://u:p@broker:1884"
    assert settings.mqtt.base_topic == "esim2"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nbase_topic = "from_file"\n')
    settings = load(path, {
        "ESIM_BRIDGE_MQTT_BASE_TOPIC": "esim2",
        "ESIM_BRIDGE_HTTP_PORT": "9001",
        "ESIM_BRIDGE_HOMEASSISTANT_DISCOVERY": "false",
        "ESIM_BRIDGE_HTTP_ALLOWED_IPS": "10.0.0.0/8, 192.168.1.2",
        "ESIM_BRIDGE_HTTP_TRUSTED_PROXIES": '["172.16.0.0/12"]',
        "ESIM_BRIDGE_STORE_DEDUP_HOURS": "1.5",
        "ESIM_BRIDGE_MQTT_EMBEDDED_LISTEN": "127.0.0.1:18830",
        "OTHER_VARIABLE": "ignored",
    })
    assert settings.mqtt.base_topic == "esim2"
    assert settings.http.port == 9001
    assert settings.homeassistant.discovery is False
    assert settings.http.allowed_ips == ["10.0.0.0/8", "192.168.1.2"]
    assert settings.http.trusted_proxies == ["172.16.0.0/12"]
    assert settings.store.dedup_hours == 1.5
    assert settings.mqtt.embedded_listen == "127.0.0.1:18830"


def test_every_problem_is_reported_naming_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[http]\nport = "8080"\nprot = 1\n[mqtt]\nqos = 5\n'
                           '[nosuch]\nx = 1\n')
    found = problems(path, {"ESIM_BRIDGE_HTTP_MAX_BODY_BYTES": "lots",
                            "ESIM_BRIDGE_MQTT_NOPE": "1", "ESIM_BRIDGE_BOGUS_KEY": "1"})
    text = "\n".join(found)
    assert len(found) == 7, found
    for needle in ("http.port", "http.prot", "mqtt.qos", "[nosuch]",
                   "ESIM_BRIDGE_HTTP_MAX_BODY_BYTES", "mqtt.nope", "ESIM_BRIDGE_BOGUS_KEY"):
        assert needle in text


def test_type_and_value_problems_are_reported_together(tmp_path: Path) -> None:
    """A wrong type must not hide the bad values of other keys (it did: one fix, one run)."""
    path = write(tmp_path, '[http]\nport = "x"\nallowed_ips = ["not-an-ip"]\npath = "nope"\n'
                           '[mqtt]\nbase_topic = "a/#"\n')
    found = problems(path, {})
    text = "\n".join(found)
    assert len(found) == 4, found
    for needle in ("http.port", "http.allowed_ips", "http.path", "mqtt.base_topic"):
        assert needle in text


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[http]\nallowed_ips = ["not-an-ip"]\n', "http.allowed_ips"),
        ('[http]\ntrusted_proxies = ["10.0.0.0/33"]\n', "http.trusted_proxies"),
        ('[http]\npath = "webhook"\n', "http.path"),
        ('[http]\nport = 70000\n', "http.port"),
        ('[mqtt]\nurl = "http://broker"\n', "mqtt.url"),
        ('[mqtt]\nurl = "mqtt://broker:notaport"\n', "mqtt.url"),
        ('[mqtt]\nbase_topic = "esim/#"\n', "mqtt.base_topic"),
        ('[mqtt]\nembedded_listen = "1883"\n', "mqtt.embedded_listen"),
        ('[homeassistant]\nprefix = ""\n', "homeassistant.prefix"),
        ('[store]\nsynchronous = "off"\n', "store.synchronous"),
        ('[store]\nmax_outbox = 0\n', "store.max_outbox"),
        ('[store]\nurl = "mysql://u:p@db/esim"\n', "store.url"),
        ('[store]\nurl = "postgresql://u:p@db:port/esim"\n', "store.url"),
        ("[http\n", "not valid TOML"),
        ('http = 5\n', "http"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    found = problems(write(tmp_path, text))
    assert any(key in problem for problem in found), found


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    assert "does not exist" in problems(tmp_path / "nope.toml")[0]


def test_render_masks_secrets() -> None:
    settings = load(None, {"ESIM_BRIDGE_HTTP_TOKEN": "topsecret",
                           "ESIM_BRIDGE_MQTT_URL": "mqtt://user:hunter2@broker:1883"})
    text = render(settings)
    assert "topsecret" not in text and "hunter2" not in text
    assert 'token = "***"' in text
    assert 'url = "mqtt://user:***@broker:1883"' in text


def test_the_store_url_password_is_masked_in_check_config_and_in_errors(
    tmp_path: Path,
) -> None:
    settings = load(None, {"ESIM_BRIDGE_STORE_URL": "postgresql://esim:hunter2@db:5432/esim"})
    assert settings.store.url == "postgresql://esim:hunter2@db:5432/esim"
    text = render(settings)
    assert "hunter2" not in text and 'url = "postgresql://esim:***@db:5432/esim"' in text
    found = problems(write(tmp_path, '[store]\nurl = "mysql://esim:hunter2@db/esim"\n'))
    assert not [p for p in found if "hunter2" in p]
    assert any("store.url" in p and "postgresql://" in p for p in found), found


def test_an_empty_store_url_in_the_environment_is_the_sqlite_file(tmp_path: Path) -> None:
    # docker-compose.yml passes ESIM_BRIDGE_STORE_URL: ${ESIM_STORE_URL:-}, empty
    # unless the replicas profile is wanted; even over a url in the file
    path = write(tmp_path, '[store]\nurl = "postgresql://esim:esim@db/esim"\n')
    settings = load(path, {"ESIM_BRIDGE_STORE_URL": "", "ESIM_BRIDGE_STORE_PATH": "/data/e.db"})
    assert settings.store.url is None
    assert settings.store.path == "/data/e.db"


def test_mask_url_without_password() -> None:
    assert config.mask_url("mqtt://broker:1883") == "mqtt://broker:1883"


def test_provider_defaults() -> None:
    settings = load(None, {})
    provider = settings.provider
    assert provider.access_code is None and provider.secret_key is None
    assert provider.base_url == "https://api.esimaccess.com"
    assert (provider.sync_minutes, provider.usage_minutes, provider.max_rps) == (360, 60, 5)
    assert provider.publish_activation is False
    assert settings.homeassistant.forget_ended_days == 30


def test_provider_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[provider]\naccess_code = "from-file"\nmax_rps = 3\n')
    settings = load(path, {
        "ESIM_BRIDGE_PROVIDER_ACCESS_CODE": "from-env",
        "ESIM_BRIDGE_PROVIDER_SECRET_KEY": "k",
        "ESIM_BRIDGE_PROVIDER_BASE_URL": "http://127.0.0.1:9",
        "ESIM_BRIDGE_PROVIDER_SYNC_MINUTES": "30",
        "ESIM_BRIDGE_PROVIDER_USAGE_MINUTES": "15",
        "ESIM_BRIDGE_PROVIDER_PUBLISH_ACTIVATION": "true",
        "ESIM_BRIDGE_HOMEASSISTANT_FORGET_ENDED_DAYS": "0",
    })
    provider = settings.provider
    assert (provider.access_code, provider.secret_key) == ("from-env", "k")
    assert provider.base_url == "http://127.0.0.1:9"
    assert (provider.sync_minutes, provider.usage_minutes, provider.max_rps) == (30, 15, 3)
    assert provider.publish_activation is True
    assert settings.homeassistant.forget_ended_days == 0


@pytest.mark.parametrize(
    ("text", "key", "says"),
    [
        ("[provider]\nusage_minutes = 5\n", "provider.usage_minutes", "at least 15"),
        ("[provider]\nmax_rps = 0\n", "provider.max_rps", "at least 1"),
        ("[provider]\nmax_rps = 9\n", "provider.max_rps", "allows 8"),
        ("[provider]\nsync_minutes = 0\n", "provider.sync_minutes", ">= 1"),
        ('[provider]\nbase_url = "api.esimaccess.com"\n', "provider.base_url", "https://"),
        ('[provider]\naccess_code = ""\n', "provider.access_code", "empty"),
        ('[provider]\nsecret_key = "k"\n', "provider.access_code", "set the access code"),
        ('[provider]\npublish_activation = "yes"\n', "provider.publish_activation", "bool"),
        ("[homeassistant]\nforget_ended_days = -1\n", "homeassistant.forget_ended_days",
         ">= 0"),
    ],
)
def test_bad_provider_values_say_what_to_do(
    tmp_path: Path, text: str, key: str, says: str
) -> None:
    found = problems(write(tmp_path, text))
    assert any(key in problem and says in problem for problem in found), found


def test_provider_secrets_are_never_shown(tmp_path: Path) -> None:
    settings = load(None, {"ESIM_BRIDGE_PROVIDER_ACCESS_CODE": "ac-topsecret",
                           "ESIM_BRIDGE_PROVIDER_SECRET_KEY": "sk-topsecret"})
    text = render(settings)
    assert "topsecret" not in text
    assert 'access_code = "***"' in text and 'secret_key = "***"' in text
    assert "# access_code is not set" in render(load(None, {}))
    # nor in the problems, whether the value is wrong itself or another key is
    path = write(tmp_path, '[provider]\naccess_code = 12345678\nsecret_key = ["sk-topsecret"]\n'
                           "max_rps = 99\n")
    found = problems(path, {"ESIM_BRIDGE_PROVIDER_ACCESS_CODE": "ac-topsecret",
                            "ESIM_BRIDGE_PROVIDER_USAGE_MINUTES": "1"})
    text = "\n".join(found)
    assert "topsecret" not in text and "12345678" not in text, text
    assert "provider.access_code" in text and "provider.secret_key" in text
