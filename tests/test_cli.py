"""The command line, run as a user runs it: real processes, real ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge import __version__
from tests.brokers import Mosquitto, free_port
from tests.processes import BridgeProcess, Watcher, post_sentinel, write_config

ESIM_BRIDGE = [sys.executable, "-m", "bridge"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30
        ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ESIM_BRIDGE_")}
    return subprocess.run([*ESIM_BRIDGE, *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=timeout)


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"esim-bridge {__version__}"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "esim-bridge"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


def test_check_config_prints_the_effective_configuration(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", {"http": {"port": 9999, "token": "sekrit"}})
    result = cli("check-config", "--config", str(path),
                 env={"ESIM_BRIDGE_MQTT_URL": "mqtt://me:pw@127.0.0.1:1"})
    assert result.returncode == 0, result.stderr
    assert "port = 9999" in result.stdout
    assert 'token = "***"' in result.stdout
    assert "sekrit" not in result.stdout and ":pw@" not in result.stdout


def test_check_config_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", {"http": {"port": "x", "colour": "red"}})
    result = cli("check-config", "--config", str(path), env={"ESIM_BRIDGE_MQTT_QOS": "9"})
    assert result.returncode == 2
    assert "http.port" in result.stderr and "http.colour" in result.stderr
    assert "ESIM_BRIDGE_MQTT_QOS" in result.stderr
    assert result.stdout == ""


def test_serve_with_a_bad_config_exits_2_without_starting(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", {"mqtt": {"url": "ftp://nope"}})
    result = cli("serve", "--config", str(path))
    assert result.returncode == 2 and "mqtt.url" in result.stderr


def test_serve_on_an_unreachable_postgresql_exits_without_showing_the_password(
    tmp_path: Path,
) -> None:
    """store.url is served now (tests/test_postgres_serve.py); a database out of reach at
    start is a clear failure, the password masked."""
    path = write_config(tmp_path / "c.toml", {
        "http": {"host": "127.0.0.1", "port": free_port()},
        "mqtt": {"url": f"mqtt://127.0.0.1:{free_port()}"},
        "store": {"url": "postgresql://esim:hunter2@127.0.0.1:9/esim"},
    })
    result = cli("serve", "--config", str(path))
    assert result.returncode != 0
    assert "PostgreSQL" in result.stderr + result.stdout
    assert "hunter2" not in result.stderr + result.stdout


def test_send_every_type_to_a_running_bridge(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bridge = BridgeProcess(tmp_path, mosquitto.url).start()
    try:
        with Watcher(mosquitto.port, ["esim/event/#", "esim/8900000000000000001/#"]) as watcher:
            for kind in ("CHECK_HEALTH", "ORDER_STATUS", "SMDP_EVENT", "ESIM_STATUS",
                         "data_usage", "VALIDITY_USAGE"):
                result = cli("send", kind, "--url", bridge.url, "--iccid", "8900000000000000001")
                assert result.returncode == 0, result.stdout + result.stderr
                assert "HTTP 200" in result.stdout
                watcher.wait_for(f"esim/event/{kind.upper()}")
            watcher.wait_for("esim/8900000000000000001/data_remaining")  # --iccid was used
            # fresh notifyIds, for every type: sending again is not a duplicate
            for kind in ("CHECK_HEALTH", "DATA_USAGE", "VALIDITY_USAGE"):
                again = cli("send", kind, "--url", bridge.url, "--iccid", "8900000000000000001")
                assert again.returncode == 0 and '"duplicate"' not in again.stdout, again.stdout
            assert "iccid" not in cli("send", "CHECK_HEALTH", "--url", bridge.url).stdout
    finally:
        bridge.stop()


def test_send_unknown_type_and_unreachable_url() -> None:
    assert cli("send", "NOPE").returncode == 2
    result = cli("send", "DATA_USAGE", "--url", f"http://127.0.0.1:{free_port()}/webhook")
    assert result.returncode == 1 and "cannot reach" in result.stderr


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="needs mosquitto-clients")
def test_readme_quick_start_on_the_embedded_broker(tmp_path: Path) -> None:
    """The README's first command, on the embedded broker: `esim-bridge send DATA_USAGE`
    makes esim/<iccid>/data_remaining appear in mosquitto_sub."""
    mqtt_port = free_port()
    bridge = BridgeProcess(tmp_path, None, {"mqtt": {"embedded_listen": f"127.0.0.1:{mqtt_port}"}})
    bridge.start()
    try:
        assert "embedded broker" in bridge.log()
        assert "this machine only" in bridge.log() and "mqtt.embedded_listen" in bridge.log()
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mqtt_port), "-C", "1", "-W", "20",
             "-t", "esim/+/data_remaining", "-v"],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            result = cli("send", "DATA_USAGE", "--url", bridge.url)
            assert result.returncode == 0, result.stderr
            out, _ = sub.communicate(timeout=25)
        finally:
            sub.kill()
        assert out.strip() == "esim/8943108170001029631/data_remaining 5368709120"
        assert bridge.terminate() == 0
    finally:
        bridge.stop()


def test_embedded_broker_on_all_addresses_for_home_assistant_elsewhere(tmp_path: Path) -> None:
    """The README's advice for Home Assistant in a VM or a container: the bridge's own
    publisher still connects (over loopback), and the log says where to point it."""
    mqtt_port = free_port()
    bridge = BridgeProcess(tmp_path, None, {"mqtt": {"embedded_listen": f"0.0.0.0:{mqtt_port}"}})
    bridge.start()  # waits for /readyz: the publisher is connected
    try:
        assert f"this machine's address, port {mqtt_port}" in bridge.log()
        connected = f"connected to the broker at 127.0.0.1:{mqtt_port}"
        deadline = time.monotonic() + 5  # info lines are written in batches
        while connected not in bridge.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert connected in bridge.log()
    finally:
        bridge.stop()


def test_embedded_broker_port_taken_says_what_to_set(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path / "c.toml", {
            "http": {"host": "127.0.0.1", "port": free_port()},
            "mqtt": {"embedded_listen": f"127.0.0.1:{port}"},
            "store": {"path": str(tmp_path / "b.db")},
        })
        result = cli("serve", "--config", str(path))
    assert result.returncode == 1
    assert "already in use" in result.stderr
    assert "mqtt.url" in result.stderr and "mqtt.embedded_listen" in result.stderr


def test_sigterm_publishes_offline_and_exits_0(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bridge = BridgeProcess(tmp_path, mosquitto.url).start()
    with Watcher(mosquitto.port, ["esim/bridge/state"]) as watcher:
        watcher.wait_for("esim/bridge/state", b"online")
        assert bridge.terminate() == 0
        watcher.wait_for("esim/bridge/state", b"offline")


def test_sigint_is_a_clean_stop_too(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Ctrl-C in the terminal the README starts it from."""
    bridge = BridgeProcess(tmp_path, mosquitto.url).start()
    with Watcher(mosquitto.port, ["esim/bridge/state"]) as watcher:
        watcher.wait_for("esim/bridge/state", b"online")
        assert bridge.proc is not None
        proc, bridge.proc = bridge.proc, None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        watcher.wait_for("esim/bridge/state", b"offline")


def test_kill_9_leaves_the_last_will(tmp_path: Path, mosquitto: Mosquitto) -> None:
    bridge = BridgeProcess(tmp_path, mosquitto.url, {"mqtt": {"keepalive": 5}}).start()
    with Watcher(mosquitto.port, ["esim/bridge/state"]) as watcher:
        watcher.wait_for("esim/bridge/state", b"online")
        bridge.kill()
        watcher.wait_for("esim/bridge/state", b"offline", timeout=15)


def test_a_second_bridge_on_the_same_port_or_store_stops_at_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Started twice by mistake, the second must leave before its publisher connects: with
    the first one's client id it knocked the first off the broker, again and again, and
    every entity in Home Assistant flapped between available and not."""
    first = BridgeProcess(tmp_path / "first", mosquitto.url).start()
    try:
        with Watcher(mosquitto.port, ["esim/bridge/state", "esim/event/#"]) as watcher:
            watcher.wait_for("esim/bridge/state", b"online")
            same_port = write_config(tmp_path / "same-port.toml", {
                "http": {"host": "127.0.0.1", "port": first.port},
                "mqtt": {"url": mosquitto.url},
                "store": {"path": str(tmp_path / "other.db")},
            })
            result = cli("serve", "--config", str(same_port))
            assert result.returncode == 1
            assert f"127.0.0.1:{first.port}" in result.stderr and "http.port" in result.stderr
            same_store = write_config(tmp_path / "same-store.toml", {
                "http": {"host": "127.0.0.1", "port": free_port()},
                "mqtt": {"url": mosquitto.url},
                "store": {"path": str(first.workdir / "bridge.db")},
            })
            result = cli("serve", "--config", str(same_store))
            assert result.returncode == 1
            assert "in use by another esim-bridge" in result.stderr
            assert "store.path" in result.stderr
            # had the first been knocked off, its reconnect's `online` would come first
            post_sentinel(first, watcher)
            assert watcher.payloads("esim/bridge/state") == [b"online"]
        assert first.get("/readyz").status == 200
    finally:
        first.stop()
    # the lock goes with the process that held it, even killed: the store can be reopened
    second = BridgeProcess(tmp_path / "first", mosquitto.url).start()
    try:
        second.kill()
    finally:
        second.stop()
    third = BridgeProcess(tmp_path / "first", mosquitto.url).start()
    third.stop()


def test_a_broker_that_cannot_be_reached_is_in_the_log(tmp_path: Path) -> None:
    """A typo in mqtt.url must show where people look first, not only in /readyz."""
    port = free_port()  # nothing listens there
    bridge = BridgeProcess(tmp_path, f"mqtt://127.0.0.1:{port}").start(wait_ready=False)
    try:
        wanted = f"cannot connect to the broker at 127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while wanted not in bridge.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = [line for line in bridge.log().splitlines() if wanted in line]
        assert lines and "WARNING" in lines[0] and "mqtt.url" in lines[0]
        ready = bridge.get("/readyz")
        assert ready.status == 503 and wanted in ready.json()["reasons"][0]
        time.sleep(3)  # two more failed retries: the same reason is not logged again
        assert len([line for line in bridge.log().splitlines() if wanted in line]) == 1
    finally:
        bridge.stop()
