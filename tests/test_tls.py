"""`mqtts://`: the bridge publishes to a broker over TLS, and checks its certificate.

A test CA (trustme) signs Mosquitto's certificate for 127.0.0.1; the bridge trusts it
through `SSL_CERT_FILE`, the way a private CA is added to a system's trust store.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.brokers import Mosquitto
from tests.processes import BridgeProcess, Watcher, fixture


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path]]:
    """Mosquitto with a TLS listener, and the CA file that trusts its certificate."""
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1")
    # Mosquitto started as root runs as the user `mosquitto`, which cannot enter pytest's
    # private tmp_path: the certificate and its (test-only) key live in a readable dir.
    shared = Path(tempfile.mkdtemp(prefix="esim-tls-"))
    shared.chmod(0o755)
    chain, key = shared / "server.pem", shared / "server.key"
    certificate.private_key_pem.write_to_path(str(key))
    with chain.open("wb") as out:
        for blob in certificate.cert_chain_pems:
            out.write(blob.bytes())
    for path in (chain, key):
        path.chmod(0o644)
    trusted = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(trusted))
    broker = Mosquitto(tmp_path / "mosquitto", tls=(chain, key)).start()
    try:
        yield broker, trusted
    finally:
        broker.stop()
        shutil.rmtree(shared, ignore_errors=True)


def test_the_bridge_publishes_over_tls(
    tmp_path: Path, tls_broker: tuple[Mosquitto, Path]
) -> None:
    broker, trusted = tls_broker
    bridge = BridgeProcess(
        tmp_path / "bridge", f"mqtts://127.0.0.1:{broker.tls_port}",
        {"homeassistant": {"discovery": False}}, env={"SSL_CERT_FILE": str(trusted)},
    )
    with Watcher(broker.port, ["esim/#"]) as watcher:  # the plain listener
        bridge.start()
        try:
            body = fixture("data_usage")
            assert bridge.post(body).status == 200
            iccid = json.loads(body)["content"]["iccid"]
            assert watcher.wait_for(f"esim/{iccid}/data_remaining") == b"5351505742"
            assert watcher.wait_for("esim/bridge/state") == b"online"
        finally:
            bridge.stop()
        # `offline` went out over TLS before the bridge closed the connection
        assert watcher.wait_for("esim/bridge/state", b"offline") == b"offline"


def test_an_untrusted_broker_certificate_is_refused(
    tmp_path: Path, tls_broker: tuple[Mosquitto, Path]
) -> None:
    broker, _ = tls_broker
    bridge = BridgeProcess(tmp_path / "bridge", f"mqtts://127.0.0.1:{broker.tls_port}",
                           {"homeassistant": {"discovery": False}})
    bridge.start(wait_ready=False)
    try:
        assert bridge.post(fixture("data_usage")).status == 200  # kept in the outbox
        deadline = time.monotonic() + 10
        while True:  # until the publisher has tried, and said why it failed
            ready = bridge.get("/readyz")
            assert ready.status == 503, "connected to a broker it must not trust"
            reasons = ready.json()["reasons"]
            if any("certificate" in reason.lower() for reason in reasons):
                break
            assert time.monotonic() < deadline, reasons
            time.sleep(0.1)
    finally:
        bridge.stop()
