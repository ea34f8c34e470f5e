"""The provider's API as a second source of state, end to end: the real `esim-bridge
serve`, a real Mosquitto, and the stand-in provider (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.publish as publish
import pytest

from tests.brokers import Mosquitto
from tests.processes import BridgeProcess, Watcher, fixture, post_sentinel, request, retained
from tests.provider_standin import ProviderStandin, profile

CODE = "standin-access-code"


def provider(standin: ProviderStandin, **more: Any) -> dict[str, dict[str, Any]]:
    return {"provider": {"access_code": CODE, "base_url": standin.url, "max_rps": 5, **more}}


def iccid(number: int) -> str:
    return str(profile(number)["iccid"])


def wait_until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not after {timeout}s")
        time.sleep(0.1)


def wait_retained(port: int, topics: set[str], timeout: float = 30.0) -> dict[str, bytes]:
    """The broker's retained messages, once it holds every one of `topics`."""
    held: dict[str, bytes] = {}

    def has_all() -> bool:
        nonlocal held
        held = retained(port, "#", wait=0.3)
        return topics <= set(held)

    wait_until(has_all, f"retained {sorted(topics - set(held))[:5]}", timeout)
    return held


@pytest.fixture
def standin() -> Iterator[ProviderStandin]:
    with ProviderStandin(access_code=CODE, esims=3) as server:
        yield server


def test_every_esim_of_the_account_appears_after_start(
    tmp_path: Path, mosquitto: Mosquitto, standin: ProviderStandin
) -> None:
    """No webhook mentioned them: their retained topics and their Home Assistant devices
    are there from the first minute, and the bridge device says how the provider is."""
    bridge = BridgeProcess(tmp_path, mosquitto.url, provider(standin)).start()
    try:
        wanted = {f"esim/{iccid(n)}/state" for n in (1, 2, 3)} | {
            f"homeassistant/device/esim_{iccid(n)}/config" for n in (1, 2, 3)} | {
            "esim/bridge/provider", "esim/bridge/balance", "esim/bridge/last_sync"}
        held = wait_retained(mosquitto.port, wanted)
    finally:
        bridge.stop()
    one = iccid(1)
    state = json.loads(held[f"esim/{one}/state"])
    assert state["esim_tran_no"] == "T00000001" and state["status"] == "GOT_RESOURCE"
    assert state["package"] == "Europe 5GB 30Days" and state["data_remaining"] == 5368709120
    assert state["expires_at"] == "2030-05-29T18:34:17+00:00"
    assert held[f"esim/{one}/package"] == b"Europe 5GB 30Days"
    assert held[f"esim/{one}/status"] == b"GOT_RESOURCE"
    assert held["esim/bridge/provider"] == b"ok"
    assert held["esim/bridge/balance"] == b"94.00"
    # Home Assistant gets the provider's entities on both devices
    esim_config = json.loads(held[f"homeassistant/device/esim_{one}/config"])
    assert {"package", "activated_at"} <= set(esim_config["cmps"])
    assert esim_config["cmps"]["package"]["state_topic"] == f"esim/{one}/package"
    bridge_config = json.loads(held["homeassistant/device/esim_bridge/config"])
    assert {"balance", "provider", "last_sync"} <= set(bridge_config["cmps"])


def test_secrets_and_activation_data_appear_nowhere(
    tmp_path: Path, mosquitto: Mosquitto, standin: ProviderStandin
) -> None:
    """The access code is in no log line and no payload; the activation code, the QR code's
    URL, the PIN and the PUK are in no topic (publish_activation is off)."""
    bridge = BridgeProcess(tmp_path, mosquitto.url, provider(standin))
    with Watcher(mosquitto.port, ["#"]) as watcher:
        bridge.start()
        try:
            watcher.wait_for("esim/bridge/last_sync", timeout=30)
            assert bridge.post(fixture("data_usage")).status == 200
            watcher.wait_for("esim/event/DATA_USAGE")
        finally:
            bridge.stop()
        everything = b"\n".join(t.encode() + b" " + p for t, p, _ in watcher.messages)
    log = bridge.log()
    for secret in (CODE, "SECRET-MATCHING", "LPA:1$", "/qr/", "12345678"):
        assert secret.encode() not in everything, secret
        assert secret not in log, secret


def test_without_an_access_code_the_provider_is_never_called(
    tmp_path: Path, mosquitto: Mosquitto, standin: ProviderStandin
) -> None:
    sections = {"provider": {"base_url": standin.url}}
    bridge = BridgeProcess(tmp_path, mosquitto.url, sections).start()
    try:
        assert bridge.post(fixture("data_usage")).status == 200
        with Watcher(mosquitto.port, ["esim/#"]) as watcher:
            watcher.wait_for("esim/bridge/state", b"online")
    finally:
        bridge.stop()
    assert standin.requests == []
    assert "esim/bridge/provider" not in retained(mosquitto.port, "esim/bridge/#")


def test_usage_moves_data_remaining_and_300_esims_never_pass_max_rps(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The eSIMs in use get their data used from `esim/usage/query` right after the first
    sync, 10 to a call; the stand-in counts the requests of every second."""
    with ProviderStandin(access_code=CODE, esims=300) as standin:
        for entry in standin.profiles:
            entry["esimStatus"] = "IN_USE"
        standin.usage["T00000007"] = {"esimTranNo": "T00000007", "dataUsage": 1073741824,
                                      "totalData": 5368709120,
                                      "lastUpdateTime": "2026-12-01T10:00:00+0000"}
        bridge = BridgeProcess(tmp_path, mosquitto.url, provider(standin)).start()
        try:
            topic = f"esim/{iccid(7)}/data_remaining"
            wait_until(lambda: retained(mosquitto.port, topic, wait=0.3).get(topic)
                       == b"4294967296", "data_remaining from the usage poll", 60)
            wait_until(lambda: standin.paths().count("esim/usage/query") >= 30,
                       "every eSIM's usage asked for", 30)
        finally:
            bridge.stop()
        assert standin.max_per_second <= 5, standin.max_per_second
        held = retained(mosquitto.port, f"esim/{iccid(7)}/#")
    state = json.loads(held[f"esim/{iccid(7)}/state"])
    assert state["data_updated_at"] == "2026-12-01T10:00:00+00:00"
    assert held[f"esim/{iccid(7)}/data_remaining_percent"] == b"80.0"


def test_a_usage_reading_older_than_a_webhook_does_not_win(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The webhook carries a newer lastUpdateTime than the provider's answer that comes
    after it (the stand-in answers slowly, so the webhook is stored first)."""
    body = json.loads(fixture("data_usage"))  # lastUpdateTime 2025-07-21T09:38:25
    one = body["content"]["iccid"]
    with ProviderStandin(access_code=CODE) as standin:
        standin.profiles = [profile(1, iccid=one, esimTranNo=body["content"]["esimTranNo"],
                                    esimStatus="IN_USE")]
        standin.usage[body["content"]["esimTranNo"]] = {
            "esimTranNo": body["content"]["esimTranNo"], "dataUsage": 1, "totalData": 10,
            "lastUpdateTime": "2025-07-01T00:00:00+0000"}
        standin.delay = 1.0
        bridge = BridgeProcess(tmp_path, mosquitto.url, provider(standin)).start()
        try:
            assert bridge.post(json.dumps(body).encode()).status == 200
            wait_until(lambda: "esim/usage/query" in standin.paths(), "the usage poll", 30)
            time.sleep(standin.delay + 1.0)  # its answer, stored (or not) by now
            held = retained(mosquitto.port, f"esim/{one}/#")
        finally:
            bridge.stop()
    assert held[f"esim/{one}/data_remaining"] == str(body["content"]["remain"]).encode()
    assert json.loads(held[f"esim/{one}/state"])["data_updated_at"] == "2025-07-21T09:38:25+00:00"


def test_an_order_resolves_to_its_esims(
    tmp_path: Path, mosquitto: Mosquitto, standin: ProviderStandin
) -> None:
    """ORDER_STATUS carries no iccid: the bridge asks for the order's profiles (the provider
    answers 200010 while it allocates them) and publishes them."""
    bridge = BridgeProcess(tmp_path, mosquitto.url, provider(standin)).start()
    try:
        wait_retained(mosquitto.port, {"esim/bridge/last_sync"})
        added = standin.allocate("B26120600000001", 2, calls=2)
        order = json.loads(fixture("order_status"))
        order["content"].update(orderNo="B26120600000001", orderStatus="GOT_RESOURCE")
        assert bridge.post(json.dumps(order).encode()).status == 200
        iccids = sorted(str(p["iccid"]) for p in added)
        held = wait_retained(mosquitto.port, {"esim/order/B26120600000001/esims"} | {
            f"esim/{i}/state" for i in iccids})
    finally:
        bridge.stop()
    assert json.loads(held["esim/order/B26120600000001/esims"]) == iccids
    assert held["esim/order/B26120600000001/status"] == b"GOT_RESOURCE"


def test_a_bridge_restarted_with_a_pending_order_resolves_it(
    tmp_path: Path, mosquitto: Mosquitto, standin: ProviderStandin
) -> None:
    """Killed while the provider still allocated the order's profiles: its webhook was
    acknowledged, so the next start resolves it, with no webhook; and the list stays on
    the broker across the restart after that, without the order being asked for again."""
    order_no = "B26120600000002"
    added = standin.allocate(order_no, 2, seconds=3600)  # 200010 for as long as it runs
    order = json.loads(fixture("order_status"))
    order["content"].update(orderNo=order_no, orderStatus="GOT_RESOURCE")
    first = BridgeProcess(tmp_path, mosquitto.url, provider(standin)).start()
    try:
        assert first.post(json.dumps(order).encode()).status == 200
        wait_until(lambda: queries(standin, orderNo=order_no) > 0, "the order asked for", 15)
    finally:
        first.kill()
    standin.pending[order_no] = 0  # allocated while no bridge ran
    topic = f"esim/order/{order_no}/esims"
    listed = json.dumps(sorted(str(p["iccid"]) for p in added), separators=(",", ":"))
    second = BridgeProcess(tmp_path, mosquitto.url, provider(standin)).start()
    try:
        wait_until_value(mosquitto.port, topic, listed.encode(), 30)
    finally:
        second.stop()
    asked = queries(standin, orderNo=order_no)
    with Watcher(mosquitto.port, [topic, "esim/event/#"]) as watcher:
        third = BridgeProcess(tmp_path, mosquitto.url, provider(standin)).start()
        try:
            post_sentinel(third, watcher)
        finally:
            third.stop()
    assert b"" not in watcher.payloads(topic)  # never cleared
    assert retained(mosquitto.port, topic)[topic] == listed.encode()
    assert queries(standin, orderNo=order_no) == asked


def test_a_reused_iccid_in_the_api_clears_the_earlier_esims_fields(
    tmp_path: Path, mosquitto: Mosquitto, standin: ProviderStandin
) -> None:
    """A webhook told of one eSIM; the provider now lists its ICCID under another."""
    body = json.loads(fixture("smdp_event"))  # with an eid
    one = body["content"]["iccid"]
    before = BridgeProcess(tmp_path, mosquitto.url).start()  # no provider yet
    try:
        assert before.post(json.dumps(body).encode()).status == 200
        wait_retained(mosquitto.port, {f"esim/{one}/eid"})
    finally:
        before.stop()
    standin.profiles = [profile(1, iccid=one, esimTranNo="T-NEW", esimStatus="GOT_RESOURCE")]
    after = BridgeProcess(tmp_path, mosquitto.url, provider(standin)).start()
    try:
        wait_until(lambda: f"esim/{one}/eid" not in retained(mosquitto.port, f"esim/{one}/#"),
                   "the earlier eSIM's eid cleared", 30)
        held = retained(mosquitto.port, f"esim/{one}/#")
    finally:
        after.stop()
    state = json.loads(held[f"esim/{one}/state"])
    assert state["esim_tran_no"] == "T-NEW" and "eid" not in state
    assert held[f"esim/{one}/package"] == b"Europe 5GB 30Days"


def test_refused_credentials_say_unauthorized_and_webhooks_go_on(
    tmp_path: Path, mosquitto: Mosquitto, standin: ProviderStandin
) -> None:
    standin.access_code = "another-code"
    bridge = BridgeProcess(tmp_path, mosquitto.url, provider(standin)).start()
    try:
        held = wait_retained(mosquitto.port, {"esim/bridge/provider"})
        assert held["esim/bridge/provider"] == b"unauthorized"
        assert bridge.post(fixture("data_usage")).status == 200
        assert bridge.get("/readyz").status == 200
    finally:
        bridge.stop()
    lines = [line for line in bridge.log().splitlines() if "provider.access_code" in line]
    assert len(lines) == 1, lines
    assert CODE not in bridge.log()


def ack_times(bridge: BridgeProcess, count: int) -> list[float]:
    body = json.loads(fixture("data_usage"))
    times = []
    for n in range(count):
        body["notifyId"] = f"speed-{n}"
        started = time.perf_counter()
        assert request(bridge.url, json.dumps(body).encode(), timeout=10).status == 200
        times.append(time.perf_counter() - started)
    return times


def test_a_hanging_provider_leaves_webhook_answers_as_fast(
    tmp_path: Path, mosquitto: Mosquitto, standin: ProviderStandin
) -> None:
    """Nothing of the provider is on the webhook path: with the provider hanging on every
    call, the median answer takes no longer than without a provider (a ratio, measured
    here against the same bridge without one, not a fixed time)."""
    standin.delay = 60.0  # every call hangs, past the client's timeout
    alone = BridgeProcess(tmp_path / "alone", mosquitto.url).start()
    try:
        without = statistics.median(ack_times(alone, 60))
    finally:
        alone.stop()
    hanging = BridgeProcess(tmp_path / "hanging", mosquitto.url, provider(standin)).start()
    try:
        wait_until(lambda: standin.requests, "the first call to the provider", 10)
        with_hanging = statistics.median(ack_times(hanging, 60))
    finally:
        hanging.stop()
    assert with_hanging < 2 * without + 0.002, (with_hanging, without)


def queries(standin: ProviderStandin, **criteria: str) -> int:
    return sum(1 for r in list(standin.requests) if r.path == "esim/query"
               and all(r.json().get(k) == v for k, v in criteria.items()))


def test_refresh_commands_read_again_at_most_once_a_minute(
    tmp_path: Path, mosquitto: Mosquitto, standin: ProviderStandin
) -> None:
    """`<base>/<iccid>/refresh` reads that eSIM's profile now (the Refresh button),
    `<base>/bridge/refresh` everything; a second press within the minute reads nothing,
    and so does a press left retained (it would come again on every reconnect)."""
    # left retained by someone: the bridge finds it on subscribing, and must not act on it
    publish.single(f"esim/{iccid(3)}/refresh", "PRESS", hostname="127.0.0.1",
                   port=mosquitto.port, retain=True)
    bridge = BridgeProcess(tmp_path, mosquitto.url, provider(standin)).start()
    one = iccid(2)
    try:
        wait_retained(mosquitto.port, {"esim/bridge/last_sync"})
        standin.profiles[1]["esimStatus"] = "IN_USE"  # changed at the provider meanwhile
        publish.single(f"esim/{one}/refresh", "PRESS", hostname="127.0.0.1",
                       port=mosquitto.port)
        wait_until(lambda: queries(standin, iccid=one) == 1, "the eSIM's profile read", 15)
        held = wait_until_value(mosquitto.port, f"esim/{one}/status", b"IN_USE")
        assert held == b"IN_USE"
        balances = standin.paths().count("balance/query")
        publish.single(f"esim/{one}/refresh", "PRESS", hostname="127.0.0.1",
                       port=mosquitto.port)  # within the minute
        publish.single("esim/bridge/refresh", "", hostname="127.0.0.1", port=mosquitto.port)
        wait_until(lambda: standin.paths().count("balance/query") == balances + 1,
                   "a full sync", 15)
        wait_until(lambda: "esim/usage/query" in standin.paths()[-3:], "its usage poll", 15)
    finally:
        bridge.stop()
    assert queries(standin, iccid=one) == 1
    assert queries(standin, iccid=iccid(3)) == 0


def wait_until_value(port: int, topic: str, payload: bytes, timeout: float = 15.0) -> bytes:
    wait_until(lambda: retained(port, topic, wait=0.3).get(topic) == payload,
               f"{topic} = {payload!r}", timeout)
    return payload


def test_the_qr_code_only_with_publish_activation_and_its_image_leaves_first(
    tmp_path: Path, mosquitto: Mosquitto, standin: ProviderStandin
) -> None:
    """With provider.publish_activation the QR code's URL is published, with an image
    entity; turned off, the image leaves the eSIM's config before the URL's topic is
    cleared (Home Assistant errs on an empty URL)."""
    one = iccid(1)
    config, url = f"homeassistant/device/esim_{one}/config", f"esim/{one}/qr_code_url"
    on = BridgeProcess(tmp_path, mosquitto.url, provider(standin, publish_activation=True))
    on.start()
    try:
        held = wait_retained(mosquitto.port, {url, config})
    finally:
        on.stop()
    assert held[url] == b"https://p.example/qr/1.png"
    assert json.loads(held[config])["cmps"]["qr_code"]["url_topic"] == url
    assert "qr_code_url" not in json.loads(held[f"esim/{one}/state"])  # never a state key
    with Watcher(mosquitto.port, [config, url]) as watcher:
        watcher.clear()
        off = BridgeProcess(tmp_path, mosquitto.url, provider(standin)).start()
        try:
            watcher.wait_for(url, b"")
        finally:
            off.stop()
        order = [(t, p) for t, p, _ in watcher.messages]
    new_config = next(i for i, (t, p) in enumerate(order) if t == config and b"qr_code" not in p)
    assert new_config < order.index((url, b""))
    assert url not in retained(mosquitto.port, f"esim/{one}/#")
