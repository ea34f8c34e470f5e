"""Cost as work grows: does the bridge stay fast with a big store and backlog?

A broker outage is when the bridge's work piles up, so the scenario makes one:
1. start the bridge, stop its broker;
2. start: a closed loop over 10,000 distinct iccids, store nearly empty;
3. fill: more webhooks until the outbox holds 100,000 unpublished messages
   (read from /metrics `esim_bridge_outbox_backlog`, else ~7 per webhook);
4. later: the same closed loop as in 2, now on 10,000 eSIMs and 100,000
   pending messages; the ratio later/start is the cost of the grown store, and
   the RSS at both points shows whether the backlog lives in memory;
5. broker back: webhooks keep coming (closed loop) while the backlog drains;
   measured are the reconnect delay, the time until every acknowledged webhook
   has reached a subscriber, the ack rate meanwhile, and anything lost.
The broker keeps a persistent session for the subscriber, so what the bridge
publishes the moment it reconnects is queued for us and not counted lost.
"""

from __future__ import annotations

import http.client
import subprocess
import time
from pathlib import Path

from bench.loadgen import LoadResult
from bench.measurement import new_tag, run_load
from bench.plan import Plan
from bench.process_tree import RssSampler
from bench.report import MSGS_PER_WEBHOOK
from bench.subscriber import Subscriber
from bench.system import Process, bridge_launch
from tests.brokers import Mosquitto

ICCIDS = 10_000
PENDING = 100_000
PHASE_SECONDS = 5.0
DRAIN_TIMEOUT = 900.0
BACKLOG_METRIC = "esim_bridge_outbox_backlog"


def backlog(port: int) -> int | None:
    """The bridge's outbox backlog from /metrics, or None if it does not say."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode(errors="replace")
    except OSError:
        return None
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith(BACKLOG_METRIC + " ") or line.startswith(BACKLOG_METRIC + "{"):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def _slice_rates(load: LoadResult, fraction: float = 0.1) -> tuple[float, float]:
    """Acked/s over the first and the last `fraction` of a count run's answers."""
    acked = sorted(load.acked)
    k = max(2, int(len(acked) * fraction))
    if len(acked) < 2 * k:
        rate = len(acked) / max(load.duration, 1e-9)
        return rate, rate
    first = k / max(acked[k - 1] - load.started, 1e-9)
    last = k / max(acked[-1] - acked[-k - 1], 1e-9)
    return first, last


def _mb(value: int) -> str:
    return f"{value / 1e6:,.1f}" if value else "—"


def run_scale(plan: Plan, workdir: Path) -> list[str]:
    """Runs the scenario on its own broker; returns the report section."""
    print("scale scenario: 10,000 iccids, 100,000 pending messages", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(workdir / "mosquitto", persistence=True).start()
    launch = bridge_launch(workdir / "bridge", broker.port)
    assert launch.http_port is not None
    port = launch.http_port
    proc = Process(launch, workdir / "bridge.log")
    sub: Subscriber | None = None
    lines = [
        f"## Cost as work grows (bridge, {ICCIDS:,} iccids, {PENDING:,} pending messages)",
        "",
    ]
    try:
        ready = proc.wait_ready(plan.ready_timeout)
        sub = Subscriber(broker.port, "esim/event/#", "bench-scale-sub", persistent=True).start()
        with RssSampler(proc.pid, interval=0.25) as rss:
            lines += _scenario(plan, broker, proc, sub, rss, port, workdir, ready)
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.SubprocessError) as exc:
        lines += [f"The scale scenario crashed: {type(exc).__name__}: {exc}", "", "```"]
        lines += [proc.tail(), "```"]
    finally:
        if sub is not None:
            sub.stop()
        proc.stop()
        broker.stop()
    return lines


class _Loads:
    """The closed-loop phases run so far, each tracked by the subscriber."""

    def __init__(self, plan: Plan, port: int, workdir: Path, sub: Subscriber) -> None:
        self.plan, self.port, self.workdir, self.sub = plan, port, workdir, sub
        self.runs: list[tuple[int, LoadResult]] = []

    def closed(self, duration: float = PHASE_SECONDS, count: int = 0) -> LoadResult:
        tag = new_tag()
        self.sub.track(tag)
        extra = {"count": count} if count else {}
        load = run_load(
            self.port,
            self.plan,
            self.workdir,
            tag,
            mode="closed",
            duration=duration,
            iccids=ICCIDS,
            **extra,
        )
        self.runs.append((tag, load))
        return load


def _scenario(
    plan: Plan,
    broker: Mosquitto,
    proc: Process,
    sub: Subscriber,
    rss: RssSampler,
    port: int,
    workdir: Path,
    ready: float,
) -> list[str]:
    loads = _Loads(plan, port, workdir, sub)
    broker.stop()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _ready(port):
        time.sleep(0.1)

    print("  start (broker down, empty store) ...", flush=True)
    rss_empty = rss.sample()
    start = loads.closed()
    rss_start = rss.sample()
    pending_start = backlog(port)
    estimated = pending_start if pending_start is not None else start.ok * MSGS_PER_WEBHOOK
    fill_count = max(0, -(-(PENDING - estimated) // MSGS_PER_WEBHOOK))

    fill: LoadResult | None = None
    fill_first = fill_last = 0.0
    if fill_count:  # a count of 0 would mean "no limit" to the load generator
        print(f"  fill ({fill_count:,} webhooks) ...", flush=True)
        fill = loads.closed(duration=1800, count=fill_count)
        fill_first, fill_last = _slice_rates(fill)
    pending_filled = backlog(port)

    print("  later (broker down, 10,000 eSIMs, 100,000+ pending) ...", flush=True)
    rss_before_later = rss.sample()
    later = loads.closed()
    rss_later = rss.sample()
    pending_later = backlog(port)
    acked_down = sum(load.ok for _, load in loads.runs)

    print("  broker back: draining while webhooks keep coming ...", flush=True)
    broker.start()
    back = time.monotonic()
    peak_before_drain = rss.peak
    during = loads.closed()
    empty_at = _wait_backlog_zero(port, back, DRAIN_TIMEOUT)
    missing = 0
    for tag, load in loads.runs:
        remaining = max(1.0, back + DRAIN_TIMEOUT - time.monotonic())
        missing += len(sub.wait_all(tag, load.seqs, remaining))
    # list() copies each dict in one step while the paho thread may still add to it
    arrivals = [t for tag, _ in loads.runs for t in list(sub.tags[tag].values())]
    first_arrival = min((t for t in arrivals if t >= back), default=None)
    last_arrival = max(arrivals, default=None)
    acked_total = acked_down + during.ok
    drained = (last_arrival - back) if last_arrival is not None else None

    def rate(load: LoadResult) -> float:
        return load.in_window / load.duration

    def pending(value: int | None) -> str:
        return "—" if value is None else f"{value:,}"

    ratio = rate(later) / rate(start) if rate(start) else 0.0
    lines = [
        "Broker stopped after the bridge was ready; every phase is a closed loop at "
        f"{plan.connections} connections over {ICCIDS:,} distinct iccids.",
        "",
        "| phase | webhooks/s acked | RSS MB | outbox backlog after |",
        "| --- | ---: | ---: | ---: |",
        f"| ready after {ready:.2f} s (empty store) | — | {_mb(rss_empty)} | 0 |",
        f"| start: broker down, {PHASE_SECONDS:g} s | {rate(start):,.0f} | {_mb(rss_start)} "
        f"| {pending(pending_start)} |",
        (
            f"| fill: {fill.ok:,} webhooks, first / last 10 % | {fill_first:,.0f} / "
            f"{fill_last:,.0f} | {_mb(rss_before_later)} | {pending(pending_filled)} |"
            if fill is not None
            else f"| fill: not needed, the start phase queued enough | — "
            f"| {_mb(rss_before_later)} | {pending(pending_filled)} |"
        ),
        f"| later: 100,000+ pending, {PHASE_SECONDS:g} s | {rate(later):,.0f} "
        f"({ratio:.2f}x start) | {_mb(rss_later)} | {pending(pending_later)} |",
        f"| broker back, while draining, {PHASE_SECONDS:g} s | {rate(during):,.0f} "
        f"| peak {_mb(rss.peak)} | — |",
        "",
    ]
    reconnect = f"{first_arrival - back:.2f} s" if first_arrival is not None else "never"
    drain_text = f"{drained:.1f} s" if drained is not None else "—"
    per_s = f" ({acked_total / drained:,.0f} webhooks/s)" if drained else ""
    lost = "0" if missing == 0 else f"**{missing:,} LOST** (after {DRAIN_TIMEOUT:g} s)"
    lines += [
        f"After the broker came back: first event on MQTT after {reconnect}; all "
        f"{acked_total:,} acknowledged webhooks on MQTT after {drain_text}{per_s}; "
        + (
            f"outbox empty after {empty_at - back:.1f} s; "
            if empty_at is not None
            else "outbox-empty time unknown (no backlog metric or never empty); "
        )
        + f"lost: {lost}; peak RSS before/after the broker returned: "
        f"{_mb(peak_before_drain)} / {_mb(rss.peak)} MB.",
    ]
    if not proc.alive():
        lines.append(f"The bridge crashed (exit {proc.popen.returncode}).")
    return lines


def _ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _wait_backlog_zero(port: int, since: float, timeout: float) -> float | None:
    """When /metrics first showed an empty outbox, or None (no metric / timeout)."""
    deadline = since + timeout
    while time.monotonic() < deadline:
        value = backlog(port)
        if value is None:
            return None
        if value == 0:
            return time.monotonic()
        time.sleep(0.25)
    return None
