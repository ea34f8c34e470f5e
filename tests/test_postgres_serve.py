"""`esim-bridge serve` on PostgreSQL (`store.url`), one replica, end to end.

The real bridge on a database of its own on the local PostgreSQL and a real Mosquitto:
webhooks reach their topics and Home Assistant's discovery; a restart republishes the
retained state from the database to a broker that lost it; and PostgreSQL out of reach
means 503 and a reason on /readyz, until it is back. (A `kill -9` with a backlog is
test_faults.py's, on both stores.)
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.brokers import Mosquitto
from tests.processes import BridgeProcess, Watcher, fixture, retained
from tests.stores import Proxy
from tests.test_faults import (
    assert_retained_state,
    broker,
    crash,
    hooks,
    iccids,
    ids,
    make_bridge,
    wait_for_events,
    wait_until,
)

__all__ = ["broker", "make_bridge"]  # fixtures of test_faults

pytestmark = pytest.mark.timeout(90)


def test_a_webhook_and_discovery_arrive_and_a_restart_republishes_them(
    broker: Mosquitto, database: str, make_bridge: Callable[..., BridgeProcess]
) -> None:
    broker.start()
    bridge = make_bridge(broker.url, database, homeassistant={"discovery": True}).start()
    body = fixture("data_usage")
    iccid = json.loads(body)["content"]["iccid"]
    with Watcher(broker.port, ["esim/#", "homeassistant/#"]) as watcher:
        assert bridge.post(body).status == 200
        watcher.wait_for("esim/event/DATA_USAGE")
        watcher.wait_for(f"esim/{iccid}/data_remaining", b"5351505742")
        watcher.wait_for(f"homeassistant/device/esim_{iccid}/config")
        bridge_config = json.loads(watcher.wait_for("homeassistant/device/esim_bridge/config"))
        assert "publisher" in bridge_config["cmps"], "which replica publishes, in Home Assistant"
    assert bridge.post(body).status == 200  # a duplicate: stored once, on PostgreSQL
    assert not (bridge.workdir / "bridge.db").exists(), "no SQLite file with store.url"
    assert not (bridge.workdir / "bridge.db.lock").exists()

    def wanted() -> dict[str, bytes]:
        held = retained(broker.port, "#", wait=0.5)
        return {t: p for t, p in held.items()
                if t.startswith(f"esim/{iccid}/") or t.startswith("homeassistant/")}

    wait_until(lambda: f"homeassistant/device/esim_{iccid}/config" in wanted(), "retained", 10)
    before = wanted()
    assert bridge.terminate() == 0
    crash(broker)  # without persistence: every retained message is gone
    broker.start()
    assert not wanted()
    bridge.start()  # the same database: the retained table is all it has
    wait_until(lambda: wanted() == before, "the retained state again, from PostgreSQL", 20)
    assert retained(broker.port, "esim/bridge/state", wait=0.5) == {"esim/bridge/state": b"online"}


def test_postgresql_out_of_reach_answers_503_says_why_and_recovers_by_itself(
    broker: Mosquitto, database: str, make_bridge: Callable[..., BridgeProcess]
) -> None:
    proxy = Proxy(("127.0.0.1", 5432))
    proxy.start()
    try:
        broker.start()
        bridge = make_bridge(broker.url, proxy.url_for(database)).start()
        batch = hooks("pgdown", iccids("22", 2), 6)
        assert bridge.post(batch[0].body).status == 200
        proxy.cut()
        assert bridge.post(batch[1].body).status == 503
        ready = bridge.get("/readyz")
        assert ready.status == 503
        reasons = " ".join(ready.json()["reasons"])
        assert "store" in reasons, reasons
        proxy.start()
        # no webhook needed: the bridge finds its way back by itself
        wait_until(lambda: bridge.get("/readyz").status == 200, "ready again", 20)
        with Watcher(broker.port, ["esim/#"]) as watcher:
            for hook in batch[2:]:
                assert bridge.post(hook.body).status == 200
            wait_for_events([watcher], ids(batch[2:]), timeout=20)
        assert_retained_state(broker.port, batch[2:])
    finally:
        proxy.cut()
