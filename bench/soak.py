"""Soak: minutes of mixed webhooks at a steady rate while the broker restarts twice.

    python -m bench.soak --minutes 3        # the real thing
    python -m bench.soak --seconds 20       # a short run

Starts Mosquitto (no persistence) and the real bridge (`python -m bridge serve`,
Home Assistant discovery off), posts all six notify types for many iccids, each
with a unique notifyId and a few sent twice on purpose, at a fixed rate from
keep-alive connections, and restarts the broker at one and two thirds of the run.
A QoS 1 subscriber on `esim/event/#` records which notifyIds came out.

The report: sent, acknowledged, published, lost (acknowledged but never seen:
must be 0), duplicated (seen more than once: allowed, delivery is at-least-once),
the bridge's peak RSS and acknowledgement times. Not part of CI's pass/fail: it
exits non-zero only if something acknowledged was lost.

The subscriber must be back before the bridge after a restart, or messages the
bridge publishes meanwhile reach nobody and look lost. So the broker restarts
refusing anonymous clients: the subscriber (with a password) reconnects and
subscribes, then a reload (SIGHUP) lets the bridge in.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.examples import TYPES, example
from tests.brokers import Mosquitto
from tests.processes import BridgeProcess

USER, PASSWORD = "soak", "soak-subscriber"
DRAIN_TIMEOUT = 120.0


# -- the broker, with a gate for the bridge ----------------------------------------------------


class GatedMosquitto(Mosquitto):
    """Mosquitto without persistence whose restart keeps anonymous clients (the bridge) out
    until `open()`, while the subscriber, who has a password, may connect."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, persistence=False)
        self.passwords: Path | None = None
        self.gated = False
        tool = shutil.which("mosquitto_passwd")
        if tool is not None:
            self.passwords = workdir / "passwords"
            self.passwords.unlink(missing_ok=True)
            subprocess.run([tool, "-b", "-c", str(self.passwords), USER, PASSWORD], check=True,
                           capture_output=True)

    def _write_config(self) -> Path:
        conf = super()._write_config()
        if self.passwords is not None:
            lines = [line for line in conf.read_text().splitlines()
                     if not line.startswith("allow_anonymous")]
            lines += [f"allow_anonymous {'false' if self.gated else 'true'}",
                      f"password_file {self.passwords}"]
            conf.write_text("\n".join(lines) + "\n")
        return conf

    def restart_gated(self) -> None:
        self.stop()
        self.gated = self.passwords is not None
        self.start()

    def open(self) -> None:
        """Let anonymous clients in again: rewrite the config and reload it."""
        if not self.gated:
            return
        self.gated = False
        self._write_config()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)


# -- the subscriber ----------------------------------------------------------------------------


class _Id(msgspec.Struct):
    notifyId: str | None = None


class Subscriber:
    """Counts, per notifyId, how often it came out on esim/event/#."""

    def __init__(self, port: int) -> None:
        self.seen: collections.Counter[str] = collections.Counter()
        self.messages = 0
        self.subscriptions = 0  # SUBACKs so far: one per (re)connect
        self.subscribed = threading.Event()
        self._acked = threading.Condition()
        self._decoder = msgspec.json.Decoder(_Id)
        self._lock = threading.Lock()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-{os.getpid()}")
        client.username_pw_set(USER, PASSWORD)
        client.reconnect_delay_set(1, 2)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client
        self.port = port

    def start(self) -> Subscriber:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise TimeoutError("the subscriber could not subscribe")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe("esim/event/#", qos=1)

    def _on_subscribe(self, *_: Any) -> None:
        with self._acked:
            self.subscriptions += 1
            self._acked.notify_all()
        self.subscribed.set()

    def wait_resubscribed(self, before: int, timeout: float) -> bool:
        """Wait for a SUBACK after the `before`-th one."""
        with self._acked:
            return self._acked.wait_for(lambda: self.subscriptions > before, timeout)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            notify_id = self._decoder.decode(message.payload).notifyId
        except msgspec.DecodeError:
            notify_id = None
        with self._lock:
            self.messages += 1
            if notify_id is not None:
                self.seen[notify_id] += 1

    def snapshot(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self.seen)


# -- the load ------------------------------------------------------------------------------------


class Bodies:
    """The mixed stream: all six types for many iccids, each with a unique notifyId, and
    now and then a body sent before, again, on purpose."""

    def __init__(self, iccids: int, duplicate_share: float, seed: int = 7) -> None:
        self.random = random.Random(seed)
        self.iccids = [f"894310817{index:010d}" for index in range(iccids)]
        self.duplicate_share = duplicate_share
        self.recent: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=2000)

    def next(self, seq: int) -> tuple[str, bytes, bool]:
        """(notifyId, body, whether it is a deliberate duplicate)."""
        if self.recent and self.random.random() < self.duplicate_share:
            notify_id, body = self.recent[self.random.randrange(len(self.recent))]
            return notify_id, body, True
        kind = self.random.choice(TYPES)
        iccid = self.random.choice(self.iccids)
        data = example(kind, iccid)
        notify_id = f"soak-{seq:09d}"
        data["notifyId"] = notify_id
        if kind == "ORDER_STATUS":
            data["content"]["orderNo"] = f"B{iccid[-12:]}"
        body = msgspec.json.encode(data)
        self.recent.append((notify_id, body))
        return notify_id, body, False


class Result(msgspec.Struct):
    notify_id: str
    due: float
    answered: float
    status: int
    duplicate_answer: bool
    deliberate_duplicate: bool


class Load:
    """A pacer that makes requests due at `rate`/s, and workers on keep-alive connections.

    Latency counts from when a request was due, so a stalled bridge shows as late
    acknowledgements rather than as a politely slower sender."""

    def __init__(self, port: int, path: str, rate: float, workers: int, bodies: Bodies) -> None:
        self.port, self.path, self.rate = port, path, rate
        self.bodies = bodies
        self.jobs: queue.Queue[tuple[str, bytes, bool, float] | None] = queue.Queue()
        self.results: list[Result] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pacer = threading.Thread(target=self._pace, name="pacer", daemon=True)
        self._workers = [threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
                         for i in range(workers)]

    def start(self) -> None:
        for worker in self._workers:
            worker.start()
        self._pacer.start()

    def stop(self) -> None:
        self._stop.set()
        self._pacer.join()
        for _ in self._workers:
            self.jobs.put(None)
        for worker in self._workers:
            worker.join(60)

    def _pace(self) -> None:
        start = time.monotonic()
        seq = 0
        while not self._stop.is_set():
            due = start + seq / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            notify_id, body, deliberate = self.bodies.next(seq)
            self.jobs.put((notify_id, body, deliberate, due))
            seq += 1

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def _work(self) -> None:
        conn = self._connect()
        headers = {"Content-Type": "application/json"}
        while (job := self.jobs.get()) is not None:
            notify_id, body, deliberate, due = job
            try:
                conn.request("POST", self.path, body, headers)
                response = conn.getresponse()
                answer = response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = self._connect()
                with self._lock:
                    self.errors[type(exc).__name__] += 1
                status, answer = 0, b""
            result = Result(notify_id, due, time.monotonic(), status,
                            b'"duplicate":true' in answer, deliberate)
            with self._lock:
                self.results.append(result)
                if status not in (0, 200):
                    self.errors[f"HTTP {status}"] += 1
        conn.close()


# -- memory ------------------------------------------------------------------------------------


def _tree(pid: int) -> Iterator[int]:
    """The process and its descendants (the publisher is a child of the bridge)."""
    yield pid
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            yield from _tree(int(child))


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemoryWatch(threading.Thread):
    """Polls the RSS of the bridge's process tree once a second; keeps each one's VmHWM."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="memory")
        self.pid = pid
        self.peak_total_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(1.0):
            self.sample()

    def sample(self) -> None:
        total = 0
        for pid in list(_tree(self.pid)):
            total += _status_kb(pid, "VmRSS")
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), _status_kb(pid, "VmHWM"))
            if pid not in self.names:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    self.names[pid] = cmdline.decode(errors="replace").strip()[:60]
                except OSError:
                    self.names[pid] = "?"
        self.peak_total_kb = max(self.peak_total_kb, total)

    def stop(self) -> None:
        self.sample()
        self._done.set()
        self.join(5)


# -- the run -----------------------------------------------------------------------------------


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _restart(broker: GatedMosquitto, subscriber: Subscriber, log: list[str], t0: float) -> None:
    before = subscriber.subscriptions
    stopped = time.monotonic()
    broker.restart_gated()
    back = subscriber.wait_resubscribed(before, 30)
    broker.open()
    waited = time.monotonic() - stopped
    subscriber_back = f"back in {waited:.1f}s" if back else "NOT back in 30s"
    gate = "then the bridge was let in" if broker.passwords else "no gate (no mosquitto_passwd)"
    log.append(f"  broker restarted at {stopped - t0:5.1f}s without persistence; "
               f"subscriber {subscriber_back}, {gate}")


def run(args: argparse.Namespace) -> int:
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="esim-soak-"))
    workdir.chmod(0o755)  # mosquitto, started as root, reads its password file as `mosquitto`
    broker = GatedMosquitto(workdir / "mosquitto")
    bridge = BridgeProcess(workdir / "bridge", broker.url, {
        "homeassistant": {"discovery": False},
        "mqtt": {"client_id": "esim-bridge-soak"},
    })
    subscriber: Subscriber | None = None
    memory: MemoryWatch | None = None
    events: list[str] = []
    try:
        broker.start()
        subscriber = Subscriber(broker.port).start()
        bridge.start()
        assert bridge.proc is not None
        memory = MemoryWatch(bridge.proc.pid)
        memory.start()
        load = Load(bridge.port, bridge.path, args.rate, args.workers,
                    Bodies(args.iccids, args.duplicates))
        print(f"soak: {args.rate:.0f} webhooks/s for {duration:.0f}s, broker restarts at 1/3 "
              f"and 2/3; work dir {workdir}", flush=True)
        t0 = time.monotonic()
        load.start()
        for fraction in (1 / 3, 2 / 3):
            time.sleep(max(0.0, t0 + duration * fraction - time.monotonic()))
            _restart(broker, subscriber, events, t0)
            print(events[-1].strip(), flush=True)
        time.sleep(max(0.0, t0 + duration - time.monotonic()))
        load.stop()
        sending_ended = time.monotonic()

        acknowledged = {r.notify_id for r in load.results if r.status == 200}
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            if not acknowledged - set(subscriber.snapshot()):
                break
            time.sleep(0.5)
        drained_after = time.monotonic() - sending_ended
        time.sleep(2.0)  # late redeliveries count as duplicates
        memory.stop()
        seen = subscriber.snapshot()
        ours = {k: v for k, v in seen.items() if k.startswith("soak-")}
        lost = sorted(acknowledged - set(ours))
        duplicated = {k: v for k, v in ours.items() if v > 1}
        latencies = [r.answered - r.due for r in load.results if r.status == 200]
        slowest = max((r for r in load.results if r.status == 200),
                      key=lambda r: r.answered - r.due, default=None)
        slowest_at = f" at {slowest.due - t0:.1f}s" if slowest is not None else ""
        deliberate = [r for r in load.results if r.deliberate_duplicate]
        alive = bridge.proc is not None and bridge.proc.poll() is None
        healthy = alive and bridge.get("/healthz").status == 200

        sent = len(load.results)
        lines = [
            "",
            f"esim-bridge soak: {duration:.0f}s at {args.rate:.0f}/s, {args.iccids} iccids, "
            f"{len(events)} broker restarts",
            *events,
            f"  sent                 {sent}  ({sent / duration:.1f}/s; "
            f"{len(deliberate)} deliberate duplicates)",
            f"  acknowledged (200)   {sum(r.status == 200 for r in load.results)} answers, "
            f"{len(acknowledged)} distinct notifyIds",
            f"  answered duplicate   {sum(r.duplicate_answer for r in load.results)}"
            f"  (of {len(deliberate)} deliberate)",
            f"  not acknowledged     {sent - sum(r.status == 200 for r in load.results)}"
            f"  {dict(load.errors) or ''}",
            f"  published            {len(ours)} distinct notifyIds on esim/event/# "
            f"({subscriber.messages} messages); all out {drained_after:.1f}s after sending ended",
            f"  lost                 {len(lost)}{'  e.g. ' + ', '.join(lost[:5]) if lost else ''}",
            f"  duplicated           {len(duplicated)} notifyIds seen more than once "
            f"({sum(duplicated.values()) - len(duplicated)} extra copies; at-least-once)",
            f"  ack time             p50 {_percentile(latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {_percentile(latencies, 0.99) * 1000:.1f} ms, "
            f"max {max(latencies, default=float('nan')) * 1000:.1f} ms{slowest_at} "
            "(from when due)",
            f"  peak RSS             {memory.peak_total_kb / 1024:.1f} MiB for the bridge's "
            "process tree (polled VmRSS)",
            *(f"    VmHWM {kb / 1024:7.1f} MiB  pid {pid} {memory.names.get(pid, '')}"
              for pid, kb in sorted(memory.hwm_kb.items())),
            f"  bridge after the run {'healthy' if healthy else 'NOT HEALTHY'}",
            f"  result               {'FAIL: acknowledged webhooks were lost' if lost else 'ok'}",
        ]
        print("\n".join(lines), flush=True)
        return 1 if lost else 0
    finally:
        try:
            bridge.stop()
            if subscriber is not None:
                subscriber.stop()
        finally:
            broker.stop()
            if memory is not None and memory.is_alive():
                memory.stop()
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=3.0, help="run length (default 3)")
    length.add_argument("--seconds", type=float, help="run length in seconds (short mode)")
    parser.add_argument("--rate", type=float, default=200.0, help="webhooks/s (default 200)")
    parser.add_argument("--workers", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--iccids", type=int, default=500)
    parser.add_argument("--duplicates", type=float, default=0.03,
                        help="share of requests that resend an earlier body (default 0.03)")
    parser.add_argument("--workdir", help="keep everything here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
