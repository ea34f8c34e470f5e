"""Several replicas on one PostgreSQL database and one broker, as real processes.

Two `esim-bridge serve` share a database of their own on the local PostgreSQL and a real
Mosquitto, which logs every connection: exactly one replica publishes at a time (the
broker never has two bridges connected at once), a `kill -9` of the publishing one
loses nothing acknowledged and the other takes over within 15 s, the same notifyId
posted to both at the same moment is published once, and a publisher cut off from the
database steps down before the other takes over.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from tests.brokers import Mosquitto
from tests.processes import BridgeProcess, Watcher, request, retained
from tests.provider_standin import ProviderStandin
from tests.stores import PostgresServer, Proxy
from tests.test_faults import (
    EVENTS,
    Poster,
    assert_delivered,
    assert_retained_state,
    hooks,
    iccids,
    ids,
    make_bridge,
    notify_ids,
    wait_for_events,
    wait_until,
)

__all__ = ["make_bridge"]  # a fixture of test_faults

pytestmark = pytest.mark.timeout(120)

TAKEOVER = 15.0  # s: the contract's bound for another replica to take over


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(tmp_path / "mosquitto", log_connections=True)
    try:
        yield mosquitto.start()
    finally:
        mosquitto.stop()


def metric(bridge: BridgeProcess, name: str) -> float | None:
    try:
        text = request(bridge.base_url + "/metrics", timeout=2).body.decode()
    except OSError:
        return None
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def publishes(bridge: BridgeProcess) -> bool:
    """It says it publishes, and is connected to the broker."""
    return (metric(bridge, "esim_bridge_publishing") == 1.0
            and metric(bridge, "esim_bridge_mqtt_connected") == 1.0)


def wait_for_publisher(bridges: list[BridgeProcess], timeout: float = 20.0) -> BridgeProcess:
    """The one replica of `bridges` that publishes, once one does; the others must not."""
    found: list[BridgeProcess] = []

    def one() -> bool:
        found[:] = [b for b in bridges if publishes(b)]
        return bool(found)

    wait_until(one, "a replica that publishes", timeout)
    assert len(found) == 1, "two replicas publish"
    for other in bridges:
        if other is not found[0]:
            assert metric(other, "esim_bridge_publishing") == 0.0
            assert metric(other, "esim_bridge_mqtt_connected") == 0.0
    return found[0]


def name(bridge: BridgeProcess) -> str:
    """How bridge/info names a replica."""
    assert bridge.proc is not None
    return f"{socket.gethostname()}:{bridge.proc.pid}"


def info_publisher(watcher: Watcher) -> str | None:
    infos = watcher.payloads("esim/bridge/info")
    return json.loads(infos[-1])["publisher"] if infos else None


CONNECTED = re.compile(r"New client connected from \S+ as (\S+) ")
GONE = re.compile(r"Client (\S+) (?:\[\S+\] )?(?:disconnected|closed its connection|has exceeded)"
                  r"|Socket error on client (\S+),")


def bridge_sessions(broker: Mosquitto) -> list[tuple[str, str]]:
    """('+' or '-', client id) for each connect and disconnect of a bridge, in the
    broker's order."""
    events = []
    for line in broker.log_path.read_text(errors="replace").splitlines():
        if found := CONNECTED.search(line):
            events.append(("+", found.group(1)))
        elif found := GONE.search(line):
            events.append(("-", found.group(1) or found.group(2)))
    return [(sign, client) for sign, client in events if client.startswith("esim-bridge-")]


def assert_one_publisher_at_a_time(broker: Mosquitto, at_least: int) -> None:
    """Watching the broker: never two bridges connected together; `at_least` sessions."""
    connected: set[str] = set()
    sessions = 0
    for sign, client in bridge_sessions(broker):
        if sign == "+":
            assert not connected, f"{client} connected while {connected} still was"
            connected.add(client)
            sessions += 1
        else:
            connected.discard(client)
    assert sessions >= at_least, bridge_sessions(broker)


def test_one_replica_publishes_and_a_kill9_of_it_loses_nothing_acknowledged(
    broker: Mosquitto, database: str, make_bridge: Callable[..., BridgeProcess]
) -> None:
    bridges = [make_bridge(broker.url, database).start() for _ in range(2)]
    with Watcher(broker.port, ["esim/#"]) as watcher:
        first = wait_for_publisher(bridges)
        other = bridges[1] if first is bridges[0] else bridges[0]
        wait_until(lambda: info_publisher(watcher) == name(first), "bridge/info names it", 15)
        assert other.get("/readyz").status == 200, "a replica that does not publish is ready"

        batch = hooks("replicas", iccids("31", 6), 240)
        poster = Poster(bridges, batch).start()  # alternately to both
        poster.wait_acked(80)
        first.kill()  # SIGKILL mid-stream: its publisher leaves with it
        killed_at = time.monotonic()
        wait_for_publisher([other], timeout=TAKEOVER + 5)
        took = time.monotonic() - killed_at
        assert took <= TAKEOVER, f"the other replica took {took:.1f} s to take over"
        poster.join()
        assert set(poster.statuses()) == {200}, poster.statuses()  # the other took them all
        wait_for_events([watcher], ids(poster.acked), timeout=30)
        watcher.settle()
        assert_delivered(list(watcher.messages), poster.acked, poster.unanswered())
        wait_until(lambda: info_publisher(watcher) == name(other), "bridge/info names it", 15)
    assert_retained_state(broker.port, poster.acked, poster.unanswered())
    assert_one_publisher_at_a_time(broker, at_least=2)


def post_together(together: threading.Barrier, body: bytes, bridge: BridgeProcess) -> int:
    together.wait(5)  # both requests leave at the same moment
    return bridge.post(body).status


def test_the_same_webhook_posted_to_both_at_the_same_moment_is_published_once(
    broker: Mosquitto, database: str, make_bridge: Callable[..., BridgeProcess]
) -> None:
    bridges = [make_bridge(broker.url, database).start() for _ in range(2)]
    batch = hooks("twice", iccids("32", 4), 40)
    with Watcher(broker.port, ["esim/#"]) as watcher, ThreadPoolExecutor(2) as pool:
        for hook in batch:
            together = threading.Barrier(2)
            post = partial(post_together, together, hook.body)
            assert list(pool.map(post, bridges)) == [200, 200]
        wait_for_events([watcher], ids(batch), timeout=30)
        wait_for_publisher(bridges)
        watcher.settle()
        published = notify_ids(list(watcher.messages), EVENTS)
        twice = sorted({n for n in published if published.count(n) > 1})
        assert not twice, f"published more than once: {twice}"
        assert_delivered(list(watcher.messages), batch)

        # eSIMs only the standby took count in the publisher's bridge/info too
        publisher = wait_for_publisher(bridges)
        standby = bridges[1] if publisher is bridges[0] else bridges[0]
        for hook in hooks("standby", iccids("35", 2), 2):
            assert standby.post(hook.body).status == 200
        wait_until(lambda: esims_in_info(watcher) == 6, "bridge/info counts 6 eSIMs", 20)


def esims_in_info(watcher: Watcher) -> int | None:
    infos = watcher.payloads("esim/bridge/info")
    return json.loads(infos[-1])["counts"]["esims"] if infos else None


def test_a_publisher_cut_off_from_the_database_steps_down_before_another_takes_over(
    broker: Mosquitto, database: str, make_bridge: Callable[..., BridgeProcess]
) -> None:
    proxy = Proxy(("127.0.0.1", 5432))
    proxy.start()
    try:
        cut_off = make_bridge(broker.url, proxy.url_for(database)).start()
        assert wait_for_publisher([cut_off]) is cut_off  # first, so it holds the lease
        other = make_bridge(broker.url, database).start()
        batch = hooks("stall", iccids("33", 3), 30)
        with Watcher(broker.port, ["esim/#"]) as watcher:
            assert cut_off.post(batch[0].body).status == 200
            wait_for_events([watcher], ids(batch[:1]), timeout=10)
            proxy.stall()  # every packet between it and PostgreSQL dropped, none refused
            stalled_at = time.monotonic()
            wait_for_publisher([other], timeout=TAKEOVER + 5)
            took = time.monotonic() - stalled_at
            assert took <= TAKEOVER, f"the other replica took {took:.1f} s to take over"
            assert metric(cut_off, "esim_bridge_publishing") == 0.0
            assert "lease" in cut_off.log(), cut_off.log()[-2000:]
            for hook in batch[1:]:
                assert other.post(hook.body).status == 200
            wait_for_events([watcher], ids(batch), timeout=20)
            watcher.settle()
            assert_delivered(list(watcher.messages), batch)
        assert_retained_state(broker.port, batch)
        assert retained(broker.port, "esim/bridge/state") == {"esim/bridge/state": b"online"}
        assert_one_publisher_at_a_time(broker, at_least=2)
    finally:
        proxy.cut()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_a_database_restart_mid_stream_loses_nothing_acknowledged(
    broker: Mosquitto, own_postgres: PostgresServer, make_bridge: Callable[..., BridgeProcess]
) -> None:
    bridges = [make_bridge(broker.url, own_postgres.url).start() for _ in range(2)]
    with Watcher(broker.port, ["esim/#"]) as watcher:
        wait_for_publisher(bridges)
        batch = hooks("pgrestart", iccids("34", 6), 300)
        poster = Poster(bridges, batch).start()
        poster.wait_acked(60)
        own_postgres.restart()  # every session ended, the publisher's lease too
        poster.join(90)
        statuses = poster.statuses()
        assert set(statuses) <= {200, 503}, statuses
        # a 503 is no acknowledgement; but a COMMIT cut off by the restart may have
        # happened: such a webhook may be published (the provider's retry is a duplicate)
        maybe = [h for h in batch if poster.answers[h.notify_id][0] != 200]
        assert len(poster.acked) > 60, "nothing was acknowledged after the restart"
        wait_for_publisher(bridges, timeout=TAKEOVER + 10)
        wait_for_events([watcher], ids(poster.acked), timeout=30)
        watcher.settle()
        assert_delivered(list(watcher.messages), poster.acked, maybe)
    assert_retained_state(broker.port, poster.acked, maybe)
    assert_one_publisher_at_a_time(broker, at_least=2)


def test_a_publisher_stopped_in_order_hands_over_cleanly(
    broker: Mosquitto, database: str, make_bridge: Callable[..., BridgeProcess]
) -> None:
    """A rolling upgrade: SIGTERM to the publishing replica. It drains, says `offline`
    and disconnects cleanly (no last will left to fire later); the other says `online`."""
    bridges = [make_bridge(broker.url, database).start() for _ in range(2)]
    with Watcher(broker.port, ["esim/bridge/state"]) as watcher:
        first = wait_for_publisher(bridges)
        other = bridges[1] if first is bridges[0] else bridges[0]
        assert first.proc is not None
        client_id = f"esim-bridge-{socket.gethostname()}-{first.proc.pid}"
        assert first.terminate() == 0
        stopped_at = time.monotonic()
        wait_for_publisher([other], timeout=TAKEOVER)
        assert time.monotonic() - stopped_at <= TAKEOVER
        watcher.settle()
        states = watcher.payloads("esim/bridge/state")
        assert states[-2:] == [b"offline", b"online"], states
    assert f"Client {client_id} disconnected." in broker.log_path.read_text()
    assert_one_publisher_at_a_time(broker, at_least=2)


def test_only_the_publishing_replica_calls_the_provider(
    broker: Mosquitto, database: str, make_bridge: Callable[..., BridgeProcess]
) -> None:
    """Each replica has a stand-in of its own for the provider's API, to tell their
    calls apart: only the publishing one's is called, until it dies; then the other's."""
    with ProviderStandin(esims=3) as first_api, ProviderStandin(esims=3) as second_api:
        apis = {}
        bridges = []
        for api in (first_api, second_api):
            bridge = make_bridge(broker.url, database, provider={
                "access_code": api.access_code, "base_url": api.url})
            bridges.append(bridge.start())
            apis[id(bridge)] = api
        publisher = wait_for_publisher(bridges)
        standby = bridges[1] if publisher is bridges[0] else bridges[0]
        wait_until(lambda: "esim/query" in apis[id(publisher)].paths(), "the first sync", 15)
        time.sleep(2)  # time enough for a second caller to show itself
        assert apis[id(standby)].requests == [], "a standby called the provider"

        publisher.kill()
        wait_for_publisher([standby], timeout=TAKEOVER)
        wait_until(lambda: "esim/query" in apis[id(standby)].paths(),
                   "the provider called by the replica that took over", 15)
        held = retained(broker.port, "esim/+/status")
        assert len(held) == 3, held  # the fleet, read from the API
