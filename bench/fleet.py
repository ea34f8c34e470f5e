"""A reseller's fleet: every eSIM of the account synced from the provider's API.

The stand-in provider (tests/provider_standin.py, a real HTTP server on 127.0.0.1)
holds N eSIMs, all IN_USE so that the usage poll runs too; the real `esim-bridge serve`
starts with the default configuration plus `[provider]` (Home Assistant discovery on).
Measured, from when the bridge process was started:
1. when every eSIM's `esim/<iccid>/state` and Home Assistant discovery config were on
   the broker (a subscriber counts them), and when every eSIM's usage was (its state
   carries `data_updated_at`); peak memory of the bridge's process tree; how many
   requests the provider got, and the most within any one second (≤ `max_rps`);
2. webhooks at a steady rate (open loop, over a fleet of 100 other eSIMs, each seen
   once before) from ready until the usage poll is on the broker: their ACK p50/p99
   while the profiles are read and stored, and while usage is polled, against the same
   bridge idle afterwards (the same load once its outbox is empty);
3. Home Assistant's birth message (`online` on `homeassistant/status`): the time until
   the subscriber has seen every eSIM's discovery config and state again. The bridge
   waits a random 0.5-2.5 s first; the delay it chose is read from its log.
Numbers only: nothing here passes or fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.disk import DuringLoad
from bench.loadgen import LoadResult
from bench.measurement import new_tag, run_load
from bench.plan import Plan
from bench.process_tree import RssSampler, cpu_seconds, rss_bytes
from bench.scale import backlog
from bench.stats import percentile
from bench.system import Process, bridge_launch
from tests.brokers import Mosquitto
from tests.provider_standin import ProviderStandin

ESIMS = 10_000
RATE = 200.0  # webhooks/s during the sync and idle
SEGMENT = 5.0  # s per load generator run while the sync goes on
IDLE_SECONDS = 15.0
MAX_RPS = 5  # the bridge's default provider.max_rps
ACCESS_CODE = "bench-fleet-access-code"
TIMEOUT = 900.0  # s for any one wait
BIRTH_TOPIC = "homeassistant/status"
DELAY_LINE = re.compile(r"republishing discovery and state in ([0-9.]+) ?s")


class FleetWatcher:
    """Subscribes to every eSIM's state and discovery config and notes when each first
    arrived, and (after `mark`) when each arrived again."""

    def __init__(self, port: int, iccids: set[str]) -> None:
        self.port = port
        self.iccids = iccids
        self.state: dict[str, float] = {}
        self.config: dict[str, float] = {}
        self.usage: dict[str, float] = {}  # state with data_updated_at (the usage poll)
        self.state_again: dict[str, float] = {}
        self.config_again: dict[str, float] = {}
        self.since: float | None = None
        self.messages = 0
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-fleet-sub")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self) -> FleetWatcher:
        self.client.connect("127.0.0.1", self.port, keepalive=60)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.stop()
            raise TimeoutError("the fleet subscriber got no SUBACK")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def mark(self, since: float) -> None:
        """Count arrivals from `since` (monotonic) on as `..._again`."""
        self.state_again.clear()
        self.config_again.clear()
        self.since = since

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe([("esim/+/state", 1), ("homeassistant/device/+/config", 1)])

    def _on_subscribe(self, *_: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        self.messages += 1
        parts = message.topic.split("/")
        if parts[0] == "esim":
            iccid, first, again = parts[1], self.state, self.state_again
            if b'"data_updated_at"' in message.payload and iccid in self.iccids:
                self.usage.setdefault(iccid, now)
        else:
            iccid, first, again = parts[2].removeprefix("esim_"), self.config, self.config_again
        if iccid not in self.iccids:
            return
        first.setdefault(iccid, now)
        if self.since is not None and now >= self.since:
            again.setdefault(iccid, now)

    def wait(self, *maps: dict[str, float], timeout: float = TIMEOUT) -> float | None:
        """When the last eSIM arrived in every one of `maps`, or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(found) >= len(self.iccids) for found in maps):
                return max(max(found.values()) for found in maps)
            time.sleep(0.1)
        return None


class Webhooks:
    """An open loop at RATE, run as consecutive load generator processes in a thread
    until `stop()`: each request's due and ACK time, to be cut into windows later."""

    def __init__(self, plan: Plan, port: int, workdir: Path) -> None:
        self.plan, self.port, self.workdir = plan, port, workdir
        self.runs: list[LoadResult] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-webhooks", daemon=True)

    def start(self) -> Webhooks:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.runs.append(run_load(self.port, self.plan, self.workdir, new_tag(),
                                          mode="open", duration=SEGMENT, rate=RATE))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                return


@dataclass
class Acks:
    """ACK latencies (s) of the requests due within a window."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @classmethod
    def within(cls, runs: list[LoadResult], start: float, end: float) -> Acks:
        found = cls()
        for run in runs:
            found.errors += run.errors + run.unanswered
            found.latencies += [a - d for d, a in zip(run.due, run.acked, strict=True)
                                if start <= d < end]
        return found

    def p(self, q: float) -> float | None:
        value = percentile(self.latencies, q)
        return None if value is None else value * 1000

    def text(self, base: Acks | None = None) -> str:
        if not self.latencies:
            return "—"
        p50, p99 = self.p(50), self.p(99)
        said = f"{p50:.1f} / {p99:.1f} / {max(self.latencies) * 1000:.0f}"
        if base is not None and base.p(99):
            said += f" ({p99 / base.p(99):.2f}x)"  # type: ignore[operator]
        return said


def run_fleet(plan: Plan, workdir: Path, esims: int = ESIMS) -> list[str]:
    """Runs the scenario on its own broker and stand-in; returns the report section."""
    print(f"fleet scenario: {esims:,} eSIMs from the stand-in provider", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [f"## Fleet: {esims:,} eSIMs synced from the provider's API", ""]
    broker = Mosquitto(workdir / "mosquitto").start()
    standin = ProviderStandin(access_code=ACCESS_CODE, esims=esims)
    for entry in standin.profiles:
        entry["esimStatus"] = "IN_USE"  # so that the usage poll asks for every one
    iccids = {str(entry["iccid"]) for entry in standin.profiles}
    standin.start()
    watcher: FleetWatcher | None = None
    proc: Process | None = None
    try:
        watcher = FleetWatcher(broker.port, iccids).start()
        launch = bridge_launch(workdir / "bridge", broker.port)
        config = workdir / "bridge" / "bridge.toml"
        config.write_text(config.read_text() + (
            f'\n[provider]\naccess_code = "{ACCESS_CODE}"\nbase_url = "{standin.url}"\n'
            f"max_rps = {MAX_RPS}\n"))
        proc = Process(launch, workdir / "bridge.log")
        with RssSampler(proc.pid, interval=0.25) as rss:
            lines += _scenario(plan, proc, standin, watcher, rss, workdir)
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.SubprocessError) as exc:
        lines += [f"The fleet scenario crashed: {type(exc).__name__}: {exc}", ""]
        if proc is not None:
            lines += ["```", proc.tail(), "```"]
    finally:
        if watcher is not None:
            watcher.stop()
        if proc is not None:
            proc.stop()
        standin.stop()
        broker.stop()
    return lines


def _scenario(
    plan: Plan,
    proc: Process,
    standin: ProviderStandin,
    watcher: FleetWatcher,
    rss: RssSampler,
    workdir: Path,
) -> list[str]:
    start = proc.started
    load_at_start = os.getloadavg()[0]
    # the disk's fsyncs beside it all: a tail the disk had too is the disk's
    with DuringLoad(workdir) as disk:
        found = _phases(plan, proc, watcher, rss, workdir)
    return _report(plan, proc, standin, watcher, rss, disk, found, start, load_at_start)


@dataclass
class _Found:
    """What `_phases` measured (monotonic times)."""

    ready: float
    rss_ready: int
    cpu: dict[str, float]
    load_from: float
    synced: float
    rss_synced: int
    used: float
    rss_used: int
    runs: list[LoadResult]
    idle_run: LoadResult
    birth: float
    again: float | None
    rss_end: int
    webhook_side: int
    publisher_side: int


def _phases(
    plan: Plan, proc: Process, watcher: FleetWatcher, rss: RssSampler, workdir: Path
) -> _Found:
    port = proc.launch.http_port
    assert port is not None
    ready = proc.wait_ready(plan.ready_timeout)
    rss_ready = rss.sample()
    cpu = {"ready": cpu_seconds(proc.pid)}
    # the webhooks' 100 eSIMs, each seen once (its discovery config), as in the main bench
    warm = run_load(port, plan, workdir, new_tag(), mode="closed", duration=60,
                    count=plan.iccids)
    if warm.ok < plan.iccids:
        raise RuntimeError(f"webhook fleet: {warm.ok} of {plan.iccids} acknowledged "
                           f"({warm.first_error or 'no answer'})")
    print(f"  ready after {ready:.2f} s; webhooks at {RATE:g}/s while the sync runs ...",
          flush=True)
    hooks = Webhooks(plan, port, workdir).start()
    load_from = time.monotonic()
    try:
        synced = watcher.wait(watcher.state, watcher.config)
        if synced is None:
            raise TimeoutError(f"not every eSIM on the broker after {TIMEOUT:g} s "
                               f"(state {len(watcher.state):,}, discovery "
                               f"{len(watcher.config):,})")
        cpu["synced"] = cpu_seconds(proc.pid)
        rss_synced = rss.sample()
        print(f"  every eSIM's state and discovery on the broker after "
              f"{synced - proc.started:.1f} s;"
              " waiting for the usage poll ...", flush=True)
        used = watcher.wait(watcher.usage)
        if used is None:
            raise TimeoutError(f"not every eSIM's usage on the broker after {TIMEOUT:g} s "
                               f"({len(watcher.usage):,})")
        cpu["used"] = cpu_seconds(proc.pid)
    finally:
        hooks.stop()
    if hooks.error:
        raise RuntimeError(f"webhooks during the sync: {hooks.error}")
    rss_used = rss.sample()
    _wait_empty(port)

    print(f"  idle: webhooks at {RATE:g}/s for {IDLE_SECONDS:g} s ...", flush=True)
    idle_run = run_load(port, plan, workdir, new_tag(), mode="open", duration=IDLE_SECONDS,
                        rate=RATE)
    _wait_empty(port)

    print("  Home Assistant's birth message ...", flush=True)
    cpu["birth"] = cpu_seconds(proc.pid)
    birth = time.monotonic()
    watcher.mark(birth)
    watcher.client.publish(BIRTH_TOPIC, b"online", qos=1)
    again = watcher.wait(watcher.state_again, watcher.config_again)
    cpu["again"] = cpu_seconds(proc.pid)
    rss_end = rss.sample()
    webhook_side, publisher_side = _rss_split(proc.pid)
    return _Found(ready, rss_ready, cpu, load_from, synced, rss_synced, used, rss_used,
                  hooks.runs, idle_run, birth, again, rss_end, webhook_side, publisher_side)


def _report(
    plan: Plan,
    proc: Process,
    standin: ProviderStandin,
    watcher: FleetWatcher,
    rss: RssSampler,
    disk: DuringLoad,
    found: _Found,
    start: float,
    load_at_start: float,
) -> list[str]:
    f = found
    ready, cpu, load_from, synced, used = f.ready, f.cpu, f.load_from, f.synced, f.used
    birth, again, idle_run = f.birth, f.again, f.idle_run
    rss_ready, rss_synced, rss_used, rss_end = f.rss_ready, f.rss_synced, f.rss_used, f.rss_end
    idle_end = max(idle_run.acked, default=idle_run.ended)
    delay = _birth_delay(proc)

    requests = standin.requests
    paths = Counter(r.path for r in requests)
    pages = [r.at for r in requests if r.path == "esim/query"]
    usages = [r.at for r in requests if r.path == "esim/usage/query"]
    sync_acks = Acks.within(f.runs, load_from, synced)
    usage_acks = Acks.within(f.runs, synced, used)
    burst_from = max(usages, default=used)  # the last usage answer: the readings stored
    burst_acks = Acks.within(f.runs, burst_from, used)
    idle_acks = Acks.within([idle_run], 0.0, float("inf"))

    def cores(a: str, b: str, t0: float, t1: float) -> str:
        return f"{(cpu[b] - cpu[a]) / max(t1 - t0, 1e-9):.2f}"

    def fsync(t0: float, t1: float) -> str:
        took = disk.window(t0, t1)
        return f"{percentile(took, 99):.1f} / {max(took):.1f}" if took else "—"

    def mb(value: int) -> str:
        return f"{value / 1e6:,.1f}"

    n = len(watcher.iccids)
    again_text = "—"
    if again is not None:
        again_text = f"{again - birth:.1f} s"
        if delay is not None:
            again_text += (f" (the bridge's random delay {delay:.1f} s, then "
                           f"{again - birth - delay:.1f} s)")
    else:
        again_text = (f"**not complete after {TIMEOUT:g} s** (state "
                      f"{len(watcher.state_again):,}, discovery {len(watcher.config_again):,} "
                      f"of {n:,})")
    rate_ratio = (sync_acks.p(99) or 0) / idle_acks.p(99) if idle_acks.p(99) else None
    aim = "—" if rate_ratio is None else (
        f"{rate_ratio:.2f}x: " + ("met" if rate_ratio <= 2 else "**not met**"))
    over = standin.max_per_second > MAX_RPS
    lines = [
        f"The stand-in provider holds {n:,} eSIMs, all IN_USE; the bridge runs its default "
        f"configuration plus `[provider]` (`max_rps = {MAX_RPS}`), Home Assistant discovery "
        f"on. Times from the start of the bridge's process. Webhooks: an open loop at "
        f"{RATE:g}/s over {plan.iccids} other eSIMs (each seen once before), from ready until "
        "every eSIM's usage was on the broker, then the same for "
        f"{IDLE_SECONDS:g} s with the bridge idle. Load average at the start "
        f"{load_at_start:.2f}, at the end {os.getloadavg()[0]:.2f} (2 cores are shared).",
        "",
        "| what | measured |",
        "| --- | ---: |",
        f"| ready | {ready:.2f} s |",
        f"| profiles read from the provider (last `esim/query` answered) | "
        f"{max(pages, default=start) - start:.1f} s, {paths['esim/query']:,} pages |",
        f"| every eSIM's state and discovery on the broker | **{synced - start:.1f} s** |",
        f"| every eSIM's usage on the broker | {used - start:.1f} s "
        f"({paths['esim/usage/query']:,} `esim/usage/query` calls, the last answered at "
        f"{max(usages, default=start) - start:.1f} s) |",
        f"| provider requests (all) / most in any second | {len(requests):,} / "
        f"{standin.max_per_second} (max_rps {MAX_RPS}: "
        + ("**exceeded**" if over else "never exceeded") + ") |",
        f"| memory of the bridge's tree: RSS at ready / synced / usage in / end | "
        f"{mb(rss_ready)} / {mb(rss_synced)} / {mb(rss_used)} / {mb(rss_end)} MB |",
        f"| peak memory: RSS / PSS | **{mb(rss.peak)} / {mb(rss.peak_pss)} MB** |",
        f"| RSS at the end: the webhook process / the publisher | {mb(f.webhook_side)} / "
        f"{mb(f.publisher_side)} MB |",
        f"| CPU of the bridge's tree (cores): reading profiles / polling usage "
        f"/ after the birth message | {cores('ready', 'synced', start + ready, synced)} / "
        f"{cores('synced', 'used', synced, used)} / "
        + (cores("birth", "again", birth, again) if again is not None else "—") + " |",
        f"| every eSIM's discovery and state again after Home Assistant's birth message | "
        f"**{again_text}** |",
        "",
        f"| webhooks @{RATE:g}/s | requests | ACK p50 / p99 / max ms (p99 vs idle) "
        "| disk fsync p99 / max ms | HTTP errors (whole load) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| while profiles are read and stored | {len(sync_acks.latencies):,} "
        f"| {sync_acks.text(idle_acks)} | {fsync(load_from, synced)} | {sync_acks.errors} |",
        f"| while usage is polled | {len(usage_acks.latencies):,} "
        f"| {usage_acks.text(idle_acks)} | {fsync(synced, used)} | — |",
        f"| ↳ from the last usage answer until all usage was on the broker | "
        f"{len(burst_acks.latencies):,} | {burst_acks.text(idle_acks)} "
        f"| {fsync(burst_from, used)} | — |",
        f"| idle, after the sync | {len(idle_acks.latencies):,} | {idle_acks.text()} "
        f"| {fsync(idle_run.started, idle_end)} | {idle_acks.errors} |",
        "",
        f"ACK p99 during the profile sync against idle (aim ≤ 2, informational): {aim}.",
    ]
    if burst_acks.latencies and idle_acks.p(99):
        ratio = (burst_acks.p(99) or 0) / idle_acks.p(99)  # type: ignore[operator]
        if ratio > 2:
            lines.append(f"While the usage poll's readings were stored, the ACK p99 was "
                         f"{ratio:.2f}x idle.")
    if not proc.alive():
        lines.append(f"The bridge crashed (exit {proc.popen.returncode}).")
    return lines


def _wait_empty(port: int, timeout: float = 120.0) -> None:
    """Until /metrics shows an empty outbox (or says nothing of it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = backlog(port)
        if value is None or value == 0:
            return
        time.sleep(0.1)


def _rss_split(pid: int) -> tuple[int, int]:
    """RSS of the bridge's own process, and of its descendants (the publisher)."""
    whole = rss_bytes(pid)
    own = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            own = int(line.split()[1]) * 1024
    return own, whole - own


def _birth_delay(proc: Process) -> float | None:
    """The random delay the bridge chose after the birth message, from its log."""
    try:
        found = DELAY_LINE.findall(proc.log.read_text(errors="replace"))
    except OSError:
        return None
    return float(found[-1]) if found else None
