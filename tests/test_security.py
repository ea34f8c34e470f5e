"""Who may post: the token, the IP allow-list and X-Forwarded-For, and secrets kept secret.

The Gate's chain logic is tested as a unit; the answers (401, 403, 200) against
the real bridge process, checking that a refused webhook changes nothing. The
token and the MQTT password never reach the log or `check-config`'s output.
"""

from __future__ import annotations

import hmac
import http.client
import ipaddress
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.security import MEMO_SIZE, Gate
from tests.brokers import Mosquitto
from tests.processes import (
    ROOT,
    BridgeProcess,
    Watcher,
    assert_changes_nothing,
    fixture,
    post_sentinel,
    write_config,
)

TOKEN = "Tk-9fQ2mZ7xW4vLr"
SENTINEL_SOURCE = "127.0.0.2"  # what private_bridge allows besides 10/8
WRONG = ("Tk-9fQ2mZ7xW4vL", "Tk-9fQ2mZ7xW4vLrX", "tk-9fq2mz7xw4vlr", "nope-Bq81")


def addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# -- the Gate, as a unit ---------------------------------------------------------------------


PROXIES = ["127.0.0.1/32", "172.16.0.0/12", "::1/128", "fd00::/8"]


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # no proxy in front: the peer is the client, X-Forwarded-For is ignored
        ("203.0.113.9", None, "203.0.113.9"),
        ("203.0.113.9", "10.1.2.3", "203.0.113.9"),
        ("203.0.113.9", "garbage", "203.0.113.9"),
        ("2001:db8::9", "10.1.2.3", "2001:db8::9"),
        # a trusted proxy: the rightmost address that is not a trusted proxy
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1", "", "127.0.0.1"),
        ("127.0.0.1", "10.1.2.3", "10.1.2.3"),
        ("127.0.0.1", " 10.1.2.3 ", "10.1.2.3"),
        ("127.0.0.1", "8.8.8.8, 10.1.2.3", "10.1.2.3"),  # what the client wrote is ignored
        ("127.0.0.1", "10.1.2.3, 8.8.8.8", "8.8.8.8"),  # a forged left entry does not help
        ("127.0.0.1", "10.1.2.3,172.16.0.5, 172.20.1.1", "10.1.2.3"),  # proxies skipped
        ("172.16.0.5", "10.1.2.3, 127.0.0.1", "10.1.2.3"),
        ("127.0.0.1", "172.16.0.5, 127.0.0.1", "172.16.0.5"),  # all proxies: the leftmost
        # garbage between the client and us: believe nobody
        ("127.0.0.1", "10.1.2.3, garbage", None),
        ("127.0.0.1", "10.1.2.3, ", None),
        ("127.0.0.1", "unknown", None),
        ("127.0.0.1", "10.1.2.3:4711", None),
        ("127.0.0.1", "[2001:db8::1]", None),
        ("127.0.0.1", ",", None),
        # garbage left of the client was written by the client: irrelevant
        ("127.0.0.1", "garbage, 10.1.2.3", "10.1.2.3"),
        # IPv6 and IPv4-mapped addresses
        ("::1", "2001:db8::7", "2001:db8::7"),
        ("::1", "2001:db8::7, fd00::3", "2001:db8::7"),
        ("::1", "2001:DB8:0:0::7", "2001:db8::7"),
        ("::ffff:127.0.0.1", "10.1.2.3", "10.1.2.3"),  # a mapped peer is its IPv4 address
        ("127.0.0.1", "::ffff:10.1.2.3", "10.1.2.3"),
        ("127.0.0.1", "10.1.2.3, ::ffff:172.16.0.5", "10.1.2.3"),
        ("::ffff:203.0.113.9", "10.1.2.3", "203.0.113.9"),
        # a peer that is no address at all
        (None, "10.1.2.3", None),
        ("not-an-ip", "10.1.2.3", None),
    ],
)
def test_gate_finds_the_client(peer: str | None, forwarded: str | None, client: str | None) -> None:
    gate = Gate(["10.0.0.0/8"], PROXIES, None)
    assert gate.client(peer, forwarded) == (addr(client) if client else None)


def test_gate_without_trusted_proxies_believes_no_header() -> None:
    gate = Gate(["10.0.0.0/8"], [], None)
    assert gate.client("127.0.0.1", "10.1.2.3") == addr("127.0.0.1")
    assert not gate.ip_allowed(gate.client("127.0.0.1", "10.1.2.3"))


def test_gate_survives_a_very_long_chain() -> None:
    gate = Gate(["10.0.0.0/8"], PROXIES, None)
    chain = ", ".join(["8.8.8.8"] * 20000 + ["10.1.2.3"] + ["172.16.0.1"] * 20000)
    assert gate.client("127.0.0.1", chain) == addr("10.1.2.3")


@pytest.mark.parametrize(
    ("allowed", "client", "ok"),
    [
        ([], None, True),  # [] allows all
        ([], "203.0.113.9", True),
        (["10.0.0.0/8"], None, False),
        (["10.0.0.0/8"], "10.255.0.1", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["3.1.131.226", "127.0.0.1"], "3.1.131.226", True),
        (["3.1.131.226"], "3.1.131.227", False),
        (["2001:db8::/32"], "2001:db8:1::5", True),
        (["2001:db8::/32"], "2001:db9::5", False),
        (["10.0.0.0/8"], "::ffff:10.1.2.3", False),  # Gate.client maps these first
        (["10.1.2.3/8"], "10.9.9.9", True),  # a host address with a prefix is its network
    ],
)
def test_gate_allow_list(allowed: list[str], client: str | None, ok: bool) -> None:
    gate = Gate(allowed, [], None)
    assert gate.ip_allowed(addr(client) if client else None) is ok


def test_gate_maps_an_ipv4_mapped_peer_before_the_allow_list() -> None:
    gate = Gate(["10.0.0.0/8"], [], None)
    assert gate.ip_allowed(gate.client("::ffff:10.1.2.3", None))


def test_gate_remembers_verdicts_without_changing_them() -> None:
    """judge() gives what client() and ip_allowed() give, the second time from its memo,
    and the memo never holds more than MEMO_SIZE pairs however many addresses come, nor a
    long X-Forwarded-For."""
    gate = Gate(["10.0.0.0/8"], PROXIES, None)
    cases = [("10.1.2.3", None), ("11.0.0.1", None), ("127.0.0.1", "11.0.0.1, 10.1.2.3"),
             ("127.0.0.1", "11.0.0.1"), ("not-an-ip", None), (None, None)]
    for _ in range(2):  # the second round is answered from the memo
        for peer, forwarded in cases:
            client = gate.client(peer, forwarded)
            assert gate.judge(peer, forwarded) == (client, gate.ip_allowed(client))
    for n in range(3 * MEMO_SIZE):
        assert gate.judge(f"11.0.{n // 256}.{n % 256}", None)[1] is False
        assert len(gate._memo) <= MEMO_SIZE
    assert gate.judge("10.1.2.3", None) == (addr("10.1.2.3"), True)
    gate._memo.clear()
    chain = ", ".join(["8.8.8.8"] * 20000 + ["10.1.2.3"])  # ~180 KB: judged, not kept
    assert gate.judge("127.0.0.1", chain) == (addr("10.1.2.3"), True)
    assert not gate._memo


@pytest.mark.parametrize(
    ("presented", "ok"),
    [(TOKEN, True), (None, False), ("", False), (TOKEN + " ", False), (TOKEN[:-1], False),
     (TOKEN.lower(), False), ("Tk-9fQ2mZ7xW4vLr\u00e9", False), ("\udcff", False)],
)
def test_gate_token(presented: str | None, ok: bool) -> None:
    assert Gate([], [], TOKEN).token_ok(presented) is ok


def test_gate_without_a_token_takes_anything() -> None:
    gate = Gate([], [], None)
    assert gate.token_ok(None) and gate.token_ok("whatever")


def test_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []

    def compare_digest(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return True  # so the verdict can only have come from here

    monkeypatch.setattr(hmac, "compare_digest", compare_digest)  # what security calls
    gate = Gate([], [], TOKEN)
    assert gate.token_ok("definitely wrong")
    assert calls == [(b"definitely wrong", TOKEN.encode())]


# -- against the real bridge -----------------------------------------------------------------



def _bridge(
    tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto, http: dict[str, Any]
) -> BridgeProcess:
    # bridges share the broker: each needs a client id of its own, or they take turns
    # kicking each other off (and republish their retained state on every reconnect)
    sections: dict[str, dict[str, object]] = {
        "homeassistant": {"discovery": False},
        "http": http,
        "mqtt": {"client_id": f"esim-bridge-{uuid.uuid4().hex[:8]}"},
    }
    return BridgeProcess(tmp_path_factory.mktemp("security") / "bridge", broker.url, sections)


@pytest.fixture(scope="module")
def token_bridge(
    tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto
) -> Iterator[BridgeProcess]:
    process = _bridge(tmp_path_factory, broker, {"token": TOKEN}).start()
    process.sentinel_headers = {"X-Webhook-Token": TOKEN}
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def private_bridge(
    tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto
) -> Iterator[BridgeProcess]:
    """Allows only 10.0.0.0/8, and trusts no proxy: a sender on 127.0.0.1 is refused.
    (127.0.0.2 is allowed too, for the tests' sentinel webhook only.)"""
    http = {"allowed_ips": ["10.0.0.0/8", f"{SENTINEL_SOURCE}/32"]}
    process = _bridge(tmp_path_factory, broker, http).start()
    process.sentinel_source = SENTINEL_SOURCE
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def proxied_bridge(
    tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto
) -> Iterator[BridgeProcess]:
    """Behind a reverse proxy on 127.0.0.1 that appends to X-Forwarded-For."""
    http = {"allowed_ips": ["10.0.0.0/8", "2001:db8::/32"], "trusted_proxies": ["127.0.0.1/32"]}
    process = _bridge(tmp_path_factory, broker, http).start()
    process.sentinel_headers = {"X-Forwarded-For": "10.9.9.9"}
    try:
        yield process
    finally:
        process.stop()



def body(tag: str) -> bytes:
    data = json.loads(fixture("smdp_event"))
    data["notifyId"] = f"{tag}-{uuid.uuid4().hex}"
    return json.dumps(data).encode()


def post(bridge: BridgeProcess, path: str, raw: bytes, headers: list[tuple[str, str]]) -> int:
    """POST with http.client, which can repeat a header (urllib cannot)."""
    conn = http.client.HTTPConnection("127.0.0.1", bridge.port, timeout=10)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(raw)))
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(raw)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


ACCEPTED = {
    "path": (f"/webhook/{TOKEN}", []),
    "path-trailing-slash": (f"/webhook/{TOKEN}/", []),
    "query": (f"/webhook?token={TOKEN}", []),
    "query-among-others": (f"/webhook?a=1&token={TOKEN}&b=2", []),
    "header": ("/webhook", [("X-Webhook-Token", TOKEN)]),
    "header-any-case": ("/webhook", [("x-webhook-token", TOKEN)]),
}
REFUSED = {
    "missing": ("/webhook", []),
    "empty-query": ("/webhook?token=", []),
    "empty-header": ("/webhook", [("X-Webhook-Token", "")]),
    "other-header": ("/webhook", [("Authorization", f"Bearer {TOKEN}")]),
    "other-query-name": (f"/webhook?secret={TOKEN}", []),
    **{f"path-{i}": (f"/webhook/{wrong}", []) for i, wrong in enumerate(WRONG)},
    **{f"query-{i}": (f"/webhook?token={wrong}", []) for i, wrong in enumerate(WRONG)},
    **{f"header-{i}": ("/webhook", [("X-Webhook-Token", wrong)]) for i, wrong in enumerate(WRONG)},
    "query-percent-garbage": ("/webhook?token=%ff%fe", []),
    "query-lone-surrogate": ("/webhook?token=%ed%a0%80", []),
    "path-percent-garbage": ("/webhook/%ff%fe", []),
    "header-latin1": ("/webhook", [("X-Webhook-Token", "Tk-\u00ff")]),
}


@pytest.mark.parametrize("where", list(ACCEPTED))
def test_the_right_token_is_accepted_wherever_it_is_carried(
    where: str, token_bridge: BridgeProcess, watcher: Watcher
) -> None:
    path, headers = ACCEPTED[where]
    raw = body(where)
    assert post(token_bridge, path, raw, headers) == 200
    watcher.wait_for("esim/event/SMDP_EVENT", raw)


@pytest.mark.parametrize("where", list(REFUSED))
def test_a_missing_or_wrong_token_is_401_and_changes_nothing(
    where: str, token_bridge: BridgeProcess, watcher: Watcher
) -> None:
    path, headers = REFUSED[where]
    statuses: list[int] = []
    raw = body(where)
    assert_changes_nothing(
        token_bridge, watcher, lambda: statuses.append(post(token_bridge, path, raw, headers))
    )
    assert statuses == [401]


def test_no_token_ever_reaches_the_log_or_the_broker(
    token_bridge: BridgeProcess, broker: Mosquitto
) -> None:
    with Watcher(broker.port, ["#"]) as everything:
        for wrong in WRONG:
            for path, headers in (
                (f"/webhook/{wrong}", []),
                (f"/webhook?token={wrong}", []),
                ("/webhook", [("X-Webhook-Token", wrong)]),
            ):
                assert post(token_bridge, path, body("wrong"), headers) == 401
        for path, headers in ACCEPTED.values():
            assert post(token_bridge, path, body("right"), headers) == 200
            # a body the bridge refuses (400) and one it takes raw, with the right token
            assert post(token_bridge, path, b"not json", headers) == 400
            raw = b'{"notifyType": "NEW", "n": "%s"}' % uuid.uuid4().hex.encode()
            assert post(token_bridge, path, raw, headers) == 200
        post_sentinel(token_bridge, everything)  # all the above published has come
        payloads = b"".join(t.encode() + p for t, p, _ in everything.messages)
    log = token_bridge.log()
    assert "missing or wrong token" in log and "accepted raw" in log  # the log was written
    for secret in (TOKEN, *WRONG):
        assert secret not in log
        assert secret.lower() not in log.lower()
        assert secret.encode() not in payloads


def test_a_sender_outside_allowed_ips_is_403_even_with_a_forged_header(
    private_bridge: BridgeProcess, watcher: Watcher
) -> None:
    statuses: list[int] = []

    def act() -> None:
        statuses.append(post(private_bridge, "/webhook", body("private"), []))
        for forged in ("10.1.2.3", "127.0.0.1, 10.1.2.3", "10.1.2.3, 10.1.2.4"):
            headers = [("X-Forwarded-For", forged)]
            statuses.append(post(private_bridge, "/webhook", body("forged"), headers))
        headers = [("X-Real-IP", "10.1.2.3"), ("Forwarded", "for=10.1.2.3")]
        statuses.append(post(private_bridge, "/webhook", body("forwarded"), headers))

    assert_changes_nothing(private_bridge, watcher, act)
    assert statuses == [403] * 5
    answer = private_bridge.post(body("message"))
    assert answer.status == 403 and "127.0.0.1" in answer.json()["error"]


@pytest.mark.parametrize(
    ("forwarded", "status"),
    [
        ([], 403),  # the proxy itself is not an allowed sender
        (["10.1.2.3"], 200),
        (["8.8.8.8"], 403),
        (["10.1.2.3, 8.8.8.8"], 403),  # the rightmost untrusted address is the client
        (["8.8.8.8, 10.1.2.3"], 200),  # what the client wrote itself does not count
        (["10.1.2.3, 127.0.0.1"], 200),  # a chain of trusted proxies is skipped
        (["10.1.2.3, 8.8.8.8, 127.0.0.1"], 403),
        (["10.1.2.3", "8.8.8.8"], 403),  # a repeated header is one list: the last counts
        (["8.8.8.8", "10.1.2.3"], 200),
        (["garbage"], 403),
        (["10.1.2.3, garbage"], 403),
        (["::ffff:10.1.2.3"], 200),
        (["2001:db8::7"], 200),
        (["2001:db9::7"], 403),
    ],
)
def test_x_forwarded_for_from_a_trusted_proxy_is_believed(
    forwarded: list[str], status: int, proxied_bridge: BridgeProcess, watcher: Watcher
) -> None:
    raw = body("proxied")
    headers = [("X-Forwarded-For", value) for value in forwarded]
    if status == 200:
        assert post(proxied_bridge, "/webhook", raw, headers) == 200
        watcher.wait_for("esim/event/SMDP_EVENT", raw)
    else:
        statuses: list[int] = []
        assert_changes_nothing(
            proxied_bridge, watcher,
            lambda: statuses.append(post(proxied_bridge, "/webhook", raw, headers)),
        )
        assert statuses == [status]


# -- check-config masks secrets --------------------------------------------------------------

MQTT_PASSWORD = "Pw-h7Kq2LxN"


def check_config(
    tmp_path: Path, sections: dict[str, dict[str, object]] | None, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "bridge", "check-config"]
    if sections is not None:
        args += ["--config", str(write_config(tmp_path / "esim-bridge.toml", sections))]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ESIM_BRIDGE_")}
    environ.update(env)
    return subprocess.run(args, cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.mark.parametrize(
    ("sections", "env"),
    [
        ({"http": {"token": TOKEN},
          "mqtt": {"url": f"mqtt://bridge:{MQTT_PASSWORD}@broker.example:1883"}}, {}),
        (None, {"ESIM_BRIDGE_HTTP_TOKEN": TOKEN,
                "ESIM_BRIDGE_MQTT_URL": f"mqtts://bridge:{MQTT_PASSWORD}@broker.example"}),
        ({"http": {"token": "overridden-by-env"}},
         {"ESIM_BRIDGE_HTTP_TOKEN": TOKEN,
          "ESIM_BRIDGE_MQTT_URL": f"mqtt://bridge:{MQTT_PASSWORD}@broker.example:1883"}),
    ],
    ids=["file", "env", "env-over-file"],
)
def test_check_config_masks_the_token_and_the_mqtt_password(
    sections: dict[str, dict[str, object]] | None, env: dict[str, str], tmp_path: Path
) -> None:
    result = check_config(tmp_path, sections, env)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert TOKEN not in output and MQTT_PASSWORD not in output
    assert "overridden-by-env" not in output
    assert 'token = "***"' in result.stdout
    assert "bridge:***@broker.example" in result.stdout


@pytest.mark.parametrize(
    ("sections", "env"),
    [
        ({"http": {"token": 4711_0815_1234}}, {}),  # a token that TOML reads as a number
        ({"http": {"token": [TOKEN]}}, {}),
        ({"mqtt": {"url": f"mqtt://bridge:{MQTT_PASSWORD}@broker.example:99999"}}, {}),
        ({"mqtt": {"url": f"http://bridge:{MQTT_PASSWORD}@broker.example"}}, {}),
        ({"mqtt": {"url": f"mqtt://bridge:{MQTT_PASSWORD}@[broker.example]:1883"}}, {}),
        (None, {"ESIM_BRIDGE_MQTT_URL": f"mqtt://bridge:{MQTT_PASSWORD}@[::1:1883",
                "ESIM_BRIDGE_HTTP_TOKEN": TOKEN, "ESIM_BRIDGE_HTTP_PORT": "http"}),
    ],
    ids=["token-number", "token-list", "bad-port", "bad-scheme", "bad-host", "env-unclosed"],
)
def test_check_config_problems_never_print_a_secret(
    sections: dict[str, dict[str, object]] | None, env: dict[str, str], tmp_path: Path
) -> None:
    result = check_config(tmp_path, sections, env)
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "problem" in result.stderr
    for secret in (TOKEN, MQTT_PASSWORD, "471108151234"):
        assert secret not in output
