"""The real bridge as a child process (`python -m bridge serve`), for end-to-end tests.

Tests post webhooks to it over HTTP and watch a real Mosquitto. They can stop it
with SIGTERM, kill it with SIGKILL, and start it again on the same store.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.brokers import free_port

ROOT = Path(__file__).resolve().parent.parent
# The provider's example webhooks exactly as published (PROVIDER.md), kept in the
# repository so that a clone runs its tests alone; test_fixtures.py checks them against
# the published set where that lies beside the checkout.
FIXTURES = ROOT / "tests" / "fixtures"
PUBLISHED_FIXTURES = ROOT.parent / "shared" / "fixtures"


def fixture(name: str) -> bytes:
    """A provider example body, byte for byte (`data_usage`, `smdp_event`, ...)."""
    return (FIXTURES / f"{name}.json").read_bytes()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


class Answer:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.body[:200]!r})"


def request(
    url: str,
    body: bytes | None = None,
    method: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Answer:
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body else "GET"))
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    if body is not None and "Content-Type" not in (headers or {}):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Answer(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.read(), dict(exc.headers))


class BridgeProcess:
    """`esim-bridge serve` with a config of the test's, on a free HTTP port.

    `sections` are merged over sensible test defaults (loopback, allowed_ips = [],
    the store in `workdir`). Pass mqtt_url=None to use the embedded broker.
    """

    def __init__(
        self,
        workdir: Path,
        mqtt_url: str | None,
        sections: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        config: dict[str, dict[str, Any]] = {
            "http": {"host": "127.0.0.1", "port": self.port, "allowed_ips": []},
            "mqtt": {"shutdown_timeout": 5.0},
            "store": {"path": str(workdir / "bridge.db")},
        }
        if mqtt_url is not None:
            config["mqtt"]["url"] = mqtt_url
        for section, values in (sections or {}).items():
            config.setdefault(section, {}).update(values)
        self.path = str(config["http"].get("path", "/webhook"))
        self.config_path = write_config(workdir / "esim-bridge.toml", config)
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "bridge.log"
        # how `post_sentinel` gets past this bridge's guard (a token, the allowed addresses)
        self.sentinel_headers: dict[str, str] = {}
        self.sentinel_source = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> BridgeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ESIM_BRIDGE_")}
        env.update(self.env)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "--config", str(self.config_path)],
            cwd=self.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.wait_serving(timeout)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the bridge exited with {self.proc.returncode}:\n{self.log()}")

    def wait_serving(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if request(self.base_url + "/healthz", timeout=1).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the bridge did not serve in {timeout}s:\n{self.log()}")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if request(self.base_url + "/readyz", timeout=1).status == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"the bridge was not ready in {timeout}s:\n{self.log()}")

    def post(self, body: bytes, path: str | None = None, **kwargs: Any) -> Answer:
        url = self.base_url + path if path is not None else self.url
        return request(url, body, **kwargs)

    def get(self, path: str) -> Answer:
        return request(self.base_url + path)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, and wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: no shutdown at all, as in a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 20)
        self.proc = None


class Watcher:
    """A paho subscriber that records every message it sees, in order."""

    def __init__(self, port: int, topics: Iterable[str] = ("#",)) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watcher-{free_port()}", protocol=mqtt.MQTTv5
        )
        self.topics = list(topics)
        # MQTT 5 "retain as published": a live subscriber sees the publisher's retain flag
        options = SubscribeOptions(qos=1, retainAsPublished=True)

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            c.subscribe([(t, options) for t in self.topics])

        def on_subscribe(c: mqtt.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
            self._subscribed.set()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            with self._cond:
                self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
                self._cond.notify_all()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        if not self._subscribed.wait(10):
            raise TimeoutError("the watcher could not subscribe")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clear(self) -> None:
        """Forget what was seen so far (after letting in-flight messages land)."""
        self.settle(quiet=0.1)
        with self._cond:
            self.messages.clear()

    def payloads(self, topic: str) -> list[bytes]:
        with self._cond:
            return [p for t, p, _ in self.messages if t == topic]

    def latest(self) -> dict[str, bytes]:
        """The last payload seen per topic."""
        with self._cond:
            return {t: p for t, p, _ in self.messages}

    def wait_for(self, topic: str, payload: bytes | None = None, timeout: float = 10.0) -> bytes:
        """Wait until `topic` is seen (with `payload`, if given); returns the payload."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, p, _ in reversed(self.messages):
                    if t == topic and (payload is None or p == payload):
                        return p
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({t for t, _, _ in self.messages})
                    raise TimeoutError(f"{topic} = {payload!r} not seen in {timeout}s; saw {seen}")
                self._cond.wait(left)

    def index(self, topic: str, payload: bytes) -> int:
        """Where `topic` with `payload` first is in `messages`."""
        with self._cond:
            return next(i for i, (t, p, _) in enumerate(self.messages)
                        if t == topic and p == payload)

    def wait_count(self, topic: str, count: int, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [p for t, p, _ in self.messages if t == topic]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(found)} of {count} on {topic} after {timeout}s")
                self._cond.wait(left)

    def settle(self, quiet: float = 0.5, timeout: float = 10.0) -> None:
        """Wait until no message arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = len(self.messages)
            while time.monotonic() < deadline:
                self._cond.wait(quiet)
                if len(self.messages) == seen:
                    return
                seen = len(self.messages)


def retained(port: int, pattern: str = "#", wait: float = 1.0) -> dict[str, bytes]:
    """The broker's retained messages under `pattern`, as a fresh subscriber sees them."""
    with Watcher(port, [pattern]) as watcher:
        watcher.settle(quiet=wait)
        return {t: p for t, p, r in watcher.messages if r}


# /metrics lines that move only when a webhook is stored: equal before and after a request
# means the request changed nothing.
STATEFUL = ('outcome="accepted"', 'outcome="duplicate"', 'outcome="raw"', "esim_bridge_esims ")


def stateful_metrics(bridge: BridgeProcess) -> list[str]:
    text = bridge.get("/metrics").body.decode()
    return sorted(line for line in text.splitlines() if any(key in line for key in STATEFUL))


# The bridge's own housekeeping topics, which move without any webhook.
QUIET = ("esim/bridge/info", "esim/bridge/state")

# A notifyType of the tests' own: the bridge publishes it raw on <base>/event/SENTINEL only.
SENTINEL = "SENTINEL"


def post_sentinel(bridge: BridgeProcess, watcher: Watcher, base: str = "esim") -> int:
    """Post a sentinel webhook and wait for its own event topic; its index in
    `watcher.messages`.

    "Nothing was published" cannot be shown by waiting a while. The outbox is first in,
    first out, so once the sentinel arrived, everything that earlier requests to this
    bridge would have published has arrived before it. `watcher` must see
    `<base>/event/SENTINEL`. (It counts as a webhook accepted raw, with a warning.)
    """
    body = json.dumps({"notifyType": SENTINEL, "notifyId": uuid.uuid4().hex}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", bridge.port, timeout=10,
                                      source_address=(bridge.sentinel_source, 0))
    try:
        conn.request("POST", bridge.path, body,
                     {"Content-Type": "application/json", **bridge.sentinel_headers})
        answer = conn.getresponse()
        assert answer.status == 200, (answer.status, answer.read())
    finally:
        conn.close()
    topic = f"{base}/event/{SENTINEL}"
    watcher.wait_for(topic, body)
    return watcher.index(topic, body)


def published(bridge: BridgeProcess, watcher: Watcher) -> list[tuple[str, bytes]]:
    """What `bridge` published since the watcher was cleared, housekeeping aside: all of
    it, since a sentinel posted now has come through (`post_sentinel`)."""
    end = post_sentinel(bridge, watcher)
    return [(t, p) for t, p, _ in watcher.messages[:end] if not t.startswith(QUIET)]


def assert_changes_nothing(
    bridge: BridgeProcess, watcher: Watcher, act: Callable[[], None]
) -> None:
    """`act` must publish nothing and leave the stored state as it was."""
    before = stateful_metrics(bridge)
    act()
    assert stateful_metrics(bridge) == before  # before the sentinel, which counts
    assert published(bridge, watcher) == []


@contextlib.contextmanager
def survives(bridge: BridgeProcess) -> Iterator[None]:
    """What the block sends leaves the bridge running, serving and ready, with no
    traceback in its log and no 503 (`outcome="unavailable"`) meanwhile."""
    log_from = bridge.log_path.stat().st_size if bridge.log_path.exists() else 0
    unavailable_before = _unavailable(bridge)
    yield
    assert bridge.proc is not None and bridge.proc.poll() is None, bridge.log()[-3000:]
    assert bridge.get("/healthz").status == 200
    assert bridge.get("/readyz").status == 200
    with open(bridge.log_path, "rb") as log_file:
        log_file.seek(log_from)
        log = log_file.read().decode(errors="replace")
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    assert _unavailable(bridge) == unavailable_before


def _unavailable(bridge: BridgeProcess) -> float:
    """Webhooks answered 503 so far, as /metrics counts them."""
    lines = bridge.get("/metrics").body.decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("esim_bridge_webhooks_total") and 'outcome="unavailable"' in line)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, and SIGKILL if it does not exit in `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
