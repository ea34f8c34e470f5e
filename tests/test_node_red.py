"""The example Node-RED flow (config/node-red/flows.json), run in a real Node-RED.

Node-RED 4 comes from the npm registry into a cache directory
(`$ESIM_BRIDGE_CACHE/node-red`, else `.cache/node-red`) and is reused on the
next run. The flow is started headless against the test Mosquitto; the test
makes the bridge's topics appear and watches `esim-automations/notify`, where
the flow publishes what a user would get on their phone.

Without Node.js, or when the install fails, the tests are skipped — unless
`CI=true`, where they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.brokers import Mosquitto, free_port
from tests.processes import BridgeProcess, Watcher, fixture, stop_process

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parent.parent
FLOWS = REPO / "config" / "node-red" / "flows.json"
NODE_RED_SPEC = "node-red@4"
NOTIFY_TOPIC = "esim-automations/notify"
KINDS = {"low_data", "installed", "expiring", "used_up"}

# The fixtures' ICCIDs (tests/fixtures), one per kind of notification.
ICCID_DATA = "8943108170001029631"
ICCID_SMDP = "8997250230000292199"
ICCID_VALIDITY = "894310817000000003"
ICCID_STATUS = "89852000263413436720"
# An eSIM whose state was retained before Node-RED started: old news, no notification.
ICCID_OLD = "8900000000000000099"


# --- Node-RED install -------------------------------------------------------


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


def _cache_dir() -> Path:
    base = os.environ.get("ESIM_BRIDGE_CACHE")
    return (Path(base) if base else REPO / ".cache") / "node-red"


# npm has been seen to leave files out of an install (TAR_ENTRY_ERROR) and still
# exit 0: check that every installed package's entry point is there.
VERIFY_JS = """\
const fs = require("fs");
const path = require("path");
const broken = [];
function visit(modules) {
    if (!fs.existsSync(modules)) return;
    for (const name of fs.readdirSync(modules)) {
        if (name.startsWith(".")) continue;
        const dir = path.join(modules, name);
        if (name.startsWith("@")) { visit(dir); continue; }
        const manifest = path.join(dir, "package.json");
        if (!fs.existsSync(manifest)) continue;
        const main = JSON.parse(fs.readFileSync(manifest, "utf8")).main;
        if (main) {
            try { require.resolve(dir); } catch (err) { broken.push(name); }
        }
        visit(path.join(dir, "node_modules"));
    }
}
visit(path.resolve(process.argv[1]));
if (broken.length) { console.log(broken.join(" ")); process.exit(1); }
"""


def _installed_version(prefix: Path) -> str | None:
    package = prefix / "node_modules" / "node-red" / "package.json"
    if not (prefix / "node_modules" / "node-red" / "red.js").is_file():
        return None
    try:
        version = json.loads(package.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None
    return version if isinstance(version, str) else None


def _usable(node: str, prefix: Path) -> bool:
    version = _installed_version(prefix)
    if version is None or not version.startswith("4."):
        return False
    check = subprocess.run(
        [node, "-e", VERIFY_JS, str(prefix / "node_modules")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return check.returncode == 0


@pytest.fixture(scope="session")
def node_red_js() -> Path:
    """red.js of a Node-RED 4 in the cache directory, installed on first use."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("Node.js (node and npm on PATH) is needed to run the Node-RED flow")
    prefix = _cache_dir()
    command = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), NODE_RED_SPEC]
    attempts = 0
    while not _usable(node, prefix):
        attempts += 1
        if attempts > 2:
            _unavailable(f"`{' '.join(command)}` left an incomplete install in {prefix}")
        shutil.rmtree(prefix / "node_modules", ignore_errors=True)
        prefix.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=540)
        except subprocess.TimeoutExpired:
            _unavailable(f"`{' '.join(command)}` took longer than 540 s")
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-2000:]
            _unavailable(f"`{' '.join(command)}` failed ({done.returncode}): {tail}")
    return prefix / "node_modules" / "node-red" / "red.js"


# --- a running Node-RED -----------------------------------------------------

SETTINGS_JS = """\
module.exports = {{
    uiHost: "127.0.0.1",
    uiPort: {port},
    httpAdminRoot: false,
    httpNodeRoot: false,
    flowFile: "flows.json",
    credentialSecret: false,
    diagnostics: {{ enabled: false, ui: false }},
    runtimeState: {{ enabled: false, ui: false }},
    telemetry: {{ enabled: false }},
    externalModules: {{
        autoInstall: false,
        palette: {{ allowInstall: false }},
        modules: {{ allowInstall: false }},
    }},
    logging: {{ console: {{ level: "info", metrics: false, audit: false }} }},
}};
"""


class NodeRed:
    """Node-RED running the example flow against one broker; no editor, no HTTP."""

    def __init__(self, red_js: Path, user_dir: Path, broker_port: int) -> None:
        self.red_js = red_js
        self.user_dir = user_dir
        self.broker_port = broker_port
        self.log_path = user_dir / "node-red.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _write_files(self) -> Path:
        self.user_dir.mkdir(parents=True, exist_ok=True)
        flows: list[dict[str, Any]] = json.loads(FLOWS.read_text())
        for node in flows:
            if node["type"] == "mqtt-broker":
                node["broker"] = "127.0.0.1"
                node["port"] = self.broker_port
        (self.user_dir / "flows.json").write_text(json.dumps(flows, indent=2))
        settings = self.user_dir / "settings.js"
        settings.write_text(SETTINGS_JS.format(port=free_port()))
        return settings

    def start(self, timeout: float = 60.0) -> None:
        settings = self._write_files()
        node = shutil.which("node")
        assert node is not None
        command = [
            node,
            str(self.red_js),
            "--settings",
            str(settings),
            "--userDir",
            str(self.user_dir),
            "flows.json",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.user_dir,
                env={**os.environ, "NODE_RED_ENABLE_PROJECTS": "false"},
            )
        connected = f"Connected to broker: mqtt://127.0.0.1:{self.broker_port}"
        deadline = time.monotonic() + timeout
        while connected not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"Node-RED exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Node-RED not connected after {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)
        self.proc = None


class Notifications:
    """Everything published on esim-automations/notify, as parsed JSON."""

    def __init__(self, broker_port: int) -> None:
        self.items: list[dict[str, Any]] = []
        self.bad: list[bytes] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", broker_port)
        self.client.subscribe(NOTIFY_TOPIC, qos=1)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"could not subscribe to {NOTIFY_TOPIC}")

    def _on_subscribe(self, *_: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            try:
                self.items.append(json.loads(msg.payload))
            except ValueError:
                self.bad.append(bytes(msg.payload))

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.items)

    def real(self) -> list[dict[str, Any]]:
        """The notifications, without the readiness probes."""
        return [n for n in self.snapshot() if not str(n.get("iccid", "")).startswith("probe")]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Publisher:
    """Publishes as the bridge does: retained, QoS 1, plain-string payloads."""

    def __init__(self, broker_port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        connected = threading.Event()
        self.client.on_connect = lambda *_: connected.set()
        self.client.connect("127.0.0.1", broker_port)
        self.client.loop_start()
        if not connected.wait(10):
            raise TimeoutError(f"could not connect to 127.0.0.1:{broker_port}")

    def publish(self, topic: str, payload: str, retain: bool = True) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_until_flow_answers(notes: Notifications, broker_port: int, timeout: float = 30.0) -> None:
    """Send live probe values on all four subscriptions until each branch answers.

    "Connected" in the log comes before the subscriptions are active; a probe
    per round (new ICCID each time) proves all four are.
    """
    publisher = Publisher(broker_port)
    try:
        deadline = time.monotonic() + timeout
        for round_no in range(10_000):
            iccid = f"probe{round_no}"
            for field, value in (
                ("data_remaining_percent", "1.0"),
                ("smdp_status", "ENABLED"),
                ("validity_remaining", "0"),
                ("status", "USED_UP"),
            ):
                publisher.publish(f"esim/{iccid}/{field}", value, retain=False)
            round_end = time.monotonic() + 1.0
            while time.monotonic() < round_end:
                kinds = {n.get("kind") for n in notes.snapshot() if n.get("iccid") == iccid}
                if kinds == KINDS:
                    return
                time.sleep(0.05)
            if time.monotonic() > deadline:
                raise AssertionError(f"the flow did not answer probes within {timeout}s")
    finally:
        publisher.close()


@pytest.fixture
def node_red(
    node_red_js: Path, mosquitto: Mosquitto, tmp_path: Path
) -> Iterator[Callable[[], NodeRed]]:
    """A factory: call it to start Node-RED (so a test can prepare the broker first)."""
    started: list[NodeRed] = []

    def start() -> NodeRed:
        red = NodeRed(node_red_js, tmp_path / "node-red", mosquitto.port)
        started.append(red)
        red.start()
        return red

    try:
        yield start
    finally:
        for red in started:
            red.stop()


@pytest.fixture
def notifications(mosquitto: Mosquitto) -> Iterator[Notifications]:
    notes = Notifications(mosquitto.port)
    try:
        yield notes
    finally:
        notes.close()


def pairs(notes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((str(n.get("iccid")), str(n.get("kind"))) for n in notes)


def check_shape(notes: list[dict[str, Any]]) -> None:
    for note in notes:
        assert set(note) == {"iccid", "kind", "message"}, note
        assert note["kind"] in KINDS, note
        assert isinstance(note["message"], str), note
        assert note["iccid"][-4:] in note["message"], note


# --- the flow file itself ---------------------------------------------------


def test_flow_file_shape() -> None:
    """What the README promises about the flow, checked without running it."""
    flows: list[dict[str, Any]] = json.loads(FLOWS.read_text())
    by_id = {node["id"]: node for node in flows}
    brokers = [n for n in flows if n["type"] == "mqtt-broker"]
    assert len(brokers) == 1
    assert (brokers[0]["broker"], int(brokers[0]["port"])) == ("localhost", 1883)
    subscriptions = sorted(n["topic"] for n in flows if n["type"] == "mqtt in")
    assert subscriptions == [
        "esim/+/data_remaining_percent",
        "esim/+/smdp_status",
        "esim/+/status",
        "esim/+/validity_remaining",
    ]
    assert all(n["broker"] == brokers[0]["id"] for n in flows if n["type"].startswith("mqtt "))
    assert any(n["type"] == "comment" for n in flows)
    functions = [n for n in flows if n["type"] == "function"]
    assert len(functions) == 4
    for function in functions:
        targets = [by_id[target] for target in function["wires"][0]]
        assert {t["type"] for t in targets} == {"mqtt out", "debug"}, function["name"]
        assert [t["topic"] for t in targets if t["type"] == "mqtt out"] == [NOTIFY_TOPIC]


# --- the flow, running ------------------------------------------------------


def test_flow_notifies_on_bridge_topics(
    mosquitto: Mosquitto, node_red: Callable[[], NodeRed], notifications: Notifications
) -> None:
    """The bridge's retained value topics, published as the bridge publishes them."""
    publisher = Publisher(mosquitto.port)
    try:
        # State from before the flow was deployed: replayed as retained, not news.
        publisher.publish(f"esim/{ICCID_OLD}/status", "USED_UP")
        publisher.publish(f"esim/{ICCID_OLD}/data_remaining_percent", "5.0")

        red = node_red()
        wait_until_flow_answers(notifications, mosquitto.port)

        values = [
            # not notifications: plenty of data, days of validity, not yet installed
            (f"esim/{ICCID_DATA}/data_remaining_percent", "80.0"),
            (f"esim/{ICCID_SMDP}/validity_remaining", "5"),
            (f"esim/{ICCID_SMDP}/smdp_status", "DOWNLOAD"),
            (f"esim/{ICCID_SMDP}/status", "GOT_RESOURCE"),
            # notifications; 20.0: the provider's 20 % webhook (~19.97 % left, one decimal)
            (f"esim/{ICCID_DATA}/data_remaining_percent", "10.0"),
            (f"esim/{ICCID_STATUS}/data_remaining_percent", "20.0"),
            (f"esim/{ICCID_SMDP}/smdp_status", "ENABLED"),
            (f"esim/{ICCID_SMDP}/status", "IN_USE"),
            (f"esim/{ICCID_VALIDITY}/validity_remaining", "1"),
            (f"esim/{ICCID_STATUS}/status", "USED_UP"),
        ]
        for topic, payload in values:
            publisher.publish(topic, payload)
        expected = sorted(
            [
                (ICCID_DATA, "low_data"),
                (ICCID_STATUS, "low_data"),
                (ICCID_SMDP, "installed"),
                (ICCID_VALIDITY, "expiring"),
                (ICCID_STATUS, "used_up"),
            ]
        )
        wait_for(lambda: len(notifications.real()) >= len(expected), 15, "5 notifications")

        # The bridge republishes its retained topics on every reconnect: no news.
        for topic, payload in values[4:]:
            publisher.publish(topic, payload)
        time.sleep(1.5)
    finally:
        publisher.close()

    got = notifications.real()
    assert pairs(got) == expected, red.log()[-3000:]
    check_shape(got)
    assert notifications.bad == []
    low_data = {n["iccid"]: n["message"] for n in got if n["kind"] == "low_data"}
    assert "10.0 %" in low_data[ICCID_DATA] and "20.0 %" in low_data[ICCID_STATUS]


def webhook(name: str, content: dict[str, Any] | None = None, **top: Any) -> bytes:
    """A provider example body from the fixtures, with some fields changed."""
    body: dict[str, Any] = json.loads(fixture(name))
    body.update(top)
    body["content"].update(content or {})
    return json.dumps(body).encode()


def test_flow_notifies_on_webhooks_through_the_bridge(
    mosquitto: Mosquitto,
    node_red: Callable[[], NodeRed],
    notifications: Notifications,
    tmp_path: Path,
) -> None:
    """End to end: provider webhooks → `esim-bridge serve` → Mosquitto → the flow."""
    bridge = BridgeProcess(tmp_path / "bridge", mosquitto.url)
    try:
        bridge.start()
        # An eSIM used up before the flow was deployed: its retained state is old news.
        old = webhook(
            "esim_status",
            {"iccid": ICCID_OLD, "esimStatus": "USED_UP"},
            notifyId="00000000000000000000000000000001",
        )
        assert bridge.post(old).json() == {"ok": True}
        with Watcher(mosquitto.port, [f"esim/{ICCID_OLD}/status"]) as watcher:
            watcher.wait_for(f"esim/{ICCID_OLD}/status", b"USED_UP")
        red = node_red()
        wait_until_flow_answers(notifications, mosquitto.port)

        bodies = [
            # no notification: half the data left, the profile only downloading
            webhook(
                "data_usage",
                {
                    "remain": 26843545600,
                    "orderUsage": 26843545600,
                    "remainThreshold": 0.5,
                    "lastUpdateTime": "2025-07-20T09:00:00Z",
                },
                eventGenerateTime="2025-07-20T09:00:05Z",
                notifyId="0f776267e8d6745db8cc316e4c146ea0",
            ),
            fixture("smdp_event"),
            # notifications
            fixture("data_usage"),  # remainThreshold 0.1: 10.0 % left
            webhook(
                "smdp_event",
                {"esimStatus": "IN_USE", "smdpStatus": "ENABLED"},
                eventGenerateTime="2025-09-11T13:35:40+0000",
                notifyId="5fcc219e32dc484598d3fd700cf37390",
            ),
            fixture("validity_usage"),  # remain 1 (DAY)
            webhook("esim_status", {"esimStatus": "USED_UP"}),
        ]
        for body in bodies:
            answer = bridge.post(body)
            assert (answer.status, answer.json()) == (200, {"ok": True}), answer
        # The provider retries: the bridge publishes nothing again, the flow stays quiet.
        assert bridge.post(fixture("data_usage")).json() == {"ok": True, "duplicate": True}

        expected = sorted(
            [
                (ICCID_DATA, "low_data"),
                (ICCID_SMDP, "installed"),
                (ICCID_VALIDITY, "expiring"),
                (ICCID_STATUS, "used_up"),
            ]
        )
        wait_for(lambda: len(notifications.real()) >= len(expected), 20, "4 notifications")

        # A restart of the bridge republishes all retained state: no news either.
        topic = f"esim/{ICCID_STATUS}/status"
        with Watcher(mosquitto.port, [topic]) as watcher:
            watcher.wait_for(topic, b"USED_UP")  # the retained copy
            bridge.terminate()
            bridge.start()
            watcher.wait_count(topic, 2)  # and the republished one
            watcher.settle()
        time.sleep(1.0)
    finally:
        bridge.stop()

    got = notifications.real()
    assert pairs(got) == expected, red.log()[-3000:] + "\n" + bridge.log()[-3000:]
    check_shape(got)
    assert "10.0 %" in {n["kind"]: n["message"] for n in got}["low_data"]
