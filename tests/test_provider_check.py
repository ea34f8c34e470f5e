"""`esim-bridge provider-check`, run as a user runs it, against the stand-in provider."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.brokers import free_port
from tests.processes import write_config
from tests.provider_standin import ProviderStandin, profile
from tests.test_cli import cli


def check(tmp_path: Path, provider: dict[str, object], env: dict[str, str] | None = None
          ) -> tuple[int, str, str]:
    path = write_config(tmp_path / "c.toml", {"provider": provider})
    result = cli("provider-check", "--config", str(path), env=env)
    return result.returncode, result.stdout, result.stderr


def test_working_credentials_print_the_balance_and_the_esims(
    tmp_path: Path, standin: ProviderStandin
) -> None:
    standin.secret_key = "standin-secret"
    standin.profiles = [profile(n) for n in range(1, 13)]
    code, out, err = check(tmp_path, {"base_url": standin.url, "secret_key": "standin-secret"},
                           env={"ESIM_BRIDGE_PROVIDER_ACCESS_CODE": standin.access_code})
    assert code == 0, err
    assert "balance: 94.00 USD" in out and "eSIMs: 12" in out and "signed" in out
    assert standin.paths() == ["balance/query", "esim/query"]
    assert standin.access_code not in out + err and "standin-secret" not in out + err


@pytest.mark.parametrize(
    ("wrong", "key"),
    [({"access_code": "not-the-code"}, "provider.access_code"),
     ({"secret_key": "not-the-secret"}, "provider.secret_key")],
)
def test_refused_credentials_say_which_key_to_fix(
    tmp_path: Path, standin: ProviderStandin, wrong: dict[str, str], key: str
) -> None:
    standin.secret_key = "standin-secret"
    provider = {"base_url": standin.url, "access_code": standin.access_code,
                "secret_key": "standin-secret", **wrong}
    code, out, err = check(tmp_path, provider)
    assert code == 1 and out == ""
    assert "balance/query" in err and key in err and "answer:" in err, err
    assert "not-the-code" not in err  # the stand-in repeats it; the bridge does not


def test_an_http_401_is_refused_credentials_too(
    tmp_path: Path, standin: ProviderStandin
) -> None:
    standin.unauthorized = "401"
    code, _, err = check(tmp_path, {"base_url": standin.url, "access_code": "nope"})
    assert code == 1 and "HTTP 401" in err and "provider.access_code" in err


def test_no_provider_there_names_the_base_url(tmp_path: Path) -> None:
    code, _, err = check(tmp_path, {"base_url": f"http://127.0.0.1:{free_port()}",
                                    "access_code": "ac"})
    assert code == 1 and "provider.base_url" in err and "no connection" in err


def test_without_an_access_code_nothing_is_sent_and_it_exits_2(
    tmp_path: Path, standin: ProviderStandin
) -> None:
    code, _, err = check(tmp_path, {"base_url": standin.url})
    assert code == 2 and "provider.access_code is not set" in err
    assert standin.requests == []


def test_a_configuration_problem_exits_2(tmp_path: Path, standin: ProviderStandin) -> None:
    code, _, err = check(tmp_path, {"base_url": standin.url, "access_code": "ac",
                                    "max_rps": 20})
    assert code == 2 and "provider.max_rps" in err
    assert standin.requests == []
