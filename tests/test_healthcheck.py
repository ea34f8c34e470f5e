"""docker/healthcheck.py, the container's HEALTHCHECK, against a real bridge: healthy
when ready, still healthy while only the broker is away (webhooks are queued), unhealthy
when nothing answers. scripts/test-container runs it inside the image as well."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.brokers import Mosquitto, free_port
from tests.processes import BridgeProcess

HEALTHCHECK = Path(__file__).resolve().parent.parent / "docker" / "healthcheck.py"


def healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESIM_BRIDGE_")}
    env["ESIM_BRIDGE_HTTP_PORT"] = str(port)  # as the container's variables give it
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30
    )


def test_a_ready_bridge_is_healthy(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bridge = BridgeProcess(tmp_path, mosquitto.url).start()
    try:
        result = healthcheck(bridge.port)
    finally:
        bridge.stop()
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("ready")


def test_the_broker_away_is_still_healthy(tmp_path: Path) -> None:
    bridge = BridgeProcess(tmp_path, f"mqtt://127.0.0.1:{free_port()}").start(wait_ready=False)
    try:
        assert bridge.get("/readyz").status == 503
        result = healthcheck(bridge.port)
    finally:
        bridge.stop()
    assert result.returncode == 0, result.stdout
    assert "queued until the broker is back" in result.stdout
    assert "MQTT broker" in result.stdout  # the reason, as `docker inspect` shows it


def test_no_answer_is_unhealthy() -> None:
    result = healthcheck(free_port())
    assert result.returncode == 1
    assert result.stdout.startswith("no answer")
