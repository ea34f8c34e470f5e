"""Shared fixtures: a real Mosquitto on a free port, and subscribers to watch it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import Mosquitto
from tests.processes import Watcher
from tests.provider_standin import ProviderStandin
from tests.stores import Place, postgres_database


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto of the test's own, free to stop, pause and restart."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One Mosquitto for a whole module whose tests leave it running."""
    mosquitto = Mosquitto(tmp_path_factory.mktemp("broker") / "mosquitto").start()
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


@pytest.fixture(scope="module")
def subscriber(broker: Mosquitto) -> Iterator[Watcher]:
    with Watcher(broker.port, ["esim/#"]) as watching:
        yield watching


@pytest.fixture
def watcher(subscriber: Watcher) -> Watcher:
    """The module's subscriber on esim/#, with what earlier tests left behind cleared."""
    subscriber.clear()
    return subscriber


@pytest.fixture
def standin() -> Iterator[ProviderStandin]:
    """A stand-in for the provider's REST API on 127.0.0.1 (tests/provider_standin.py)."""
    with ProviderStandin() as running:
        yield running


@pytest.fixture
def database() -> Iterator[str]:
    """A database of the test's own on the local PostgreSQL (dropped afterwards): its URL."""
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    """Where a store of the test's own lives, on each backend in turn: a SQLite file, or a
    database of its own on the local PostgreSQL (dropped afterwards)."""
    if request.param == "sqlite":
        yield tmp_path / "bridge.db"
        return
    with postgres_database() as url:
        yield url
