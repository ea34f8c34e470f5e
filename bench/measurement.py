"""One round of one system: start it, load it, watch MQTT, stop it.

The phases, each with its own notifyId tag:
0. the fleet: one webhook for each of its eSIMs, awaited on MQTT, so that no
   measured phase pays for an eSIM's first sight (the bridge's Home Assistant
   discovery config), which a real fleet pays once;
1. warm-up (closed loop, not counted): imports, JITs and caches settle;
2. closed loop at N connections: acknowledged webhooks/s, CPU of both sides;
3. drain: time from the end of that load until the subscriber has seen every
   acknowledged webhook (a system that acknowledges faster than it publishes
   builds a backlog, and this is where it shows);
4. open loop at a fixed rate over the fleet: ACK latency and webhook-to-subscriber
   latency, both counted from when the request was due, with the disk's fsync
   p99 probed over the same seconds;
5. for systems that do work on an eSIM's first sight (the bridge), the same
   open loop with a never-seen iccid in every webhook.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from bench.disk import DuringLoad
from bench.loadgen import LoadResult
from bench.plan import Plan
from bench.process_tree import RssSampler, cpu_seconds
from bench.stats import percentile
from bench.subscriber import Subscriber
from bench.system import ROOT, Launch, Process, SystemSpec

_tags = itertools.count(random.randrange(1 << 20, 1 << 30))


def new_tag() -> int:
    """A notifyId prefix no other phase of this run (or a recent run) uses."""
    return next(_tags)


@dataclass
class Latency:
    """One open-loop phase at the plan's rate, in ms; `disk_p99` is the fsync probe's
    p99 over the same seconds."""

    ack_p50: float | None = None
    ack_p99: float | None = None
    e2e_p50: float | None = None
    e2e_p99: float | None = None
    disk_p99: float | None = None


@dataclass
class RoundResult:
    key: str
    round: int
    error: str | None = None
    ready_s: float | None = None
    rate: float | None = None  # acknowledged webhooks/s (paho: acked messages/s)
    http_errors: int = 0
    first_error: str = ""
    warm: Latency = field(default_factory=Latency)  # over the fleet, every eSIM known
    never_seen: Latency | None = None  # a new eSIM in every webhook
    drain_s: float | None = None
    drain_timed_out: bool = False
    delivered: int | None = None
    lost: int | None = None
    duplicates: int = 0
    delivered_rate: float | None = None  # delivered / (load + drain), webhooks/s
    peak_rss: int = 0
    peak_pss: int = 0
    system_cores: float | None = None
    load_cores: float | None = None
    notes: list[str] = field(default_factory=list)


def run_load(
    port: int | Sequence[int], plan: Plan, workdir: Path, tag: int, *, mode: str,
    duration: float, **extra: float,
) -> LoadResult:
    """Runs the load generator in its own process and reads back what it did; given
    several ports (replicas), it sends to each in turn."""
    out = workdir / f"load-{tag:08x}.msgpack"
    ports = [port] if isinstance(port, int) else list(port)
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port", *map(str, ports),
        *("--mode", mode, "--duration", str(duration)),
        *("--connections", str(plan.connections), "--tag", hex(tag)),
        *("--iccids", str(int(extra.pop("iccids", plan.iccids)))),
        *("--out", str(out)),
    ]
    for name, value in extra.items():
        argv += [f"--{name}", str(int(value) if name == "count" else value)]
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=duration + 120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-800:]}")
    result = msgspec.msgpack.decode(out.read_bytes(), type=LoadResult)
    out.unlink()
    return result


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def measure_webhook_system(
    spec: SystemSpec, plan: Plan, mqtt_port: int, workdir: Path, round_no: int
) -> RoundResult:
    """One round of one system. A system with replicas is all of them: the load goes to
    each in turn, memory and CPU are their sum, and it is ready when the last one is."""
    result = RoundResult(spec.key, round_no)
    launch: Launch | None = None
    procs: list[Process] = []
    sub: Subscriber | None = None
    try:
        launch = spec.launch(workdir, mqtt_port)
        ports = [one.http_port for one in launch.everyone if one.http_port is not None]
        for n, one in enumerate(launch.everyone):
            log = workdir / (f"{spec.key}.log" if n == 0 else f"{spec.key}-{n + 1}.log")
            procs.append(Process(one, log))
        result.ready_s = max(proc.wait_ready(plan.ready_timeout) for proc in procs)
        if spec.topic_filter is not None:
            client_id = f"bench-sub-{spec.key}-{round_no}"
            sub = Subscriber(mqtt_port, spec.topic_filter, client_id).start()
        with RssSampler(*(proc.pid for proc in procs)) as rss:
            _warm_fleet(result, sub, plan, ports, workdir)
            run_load(ports, plan, workdir, new_tag(), mode="closed", duration=plan.warmup)
            _closed_phase(result, procs, sub, plan, ports, workdir)
            result.warm = _open_phase(result, sub, plan, ports, workdir, plan.iccids)
            if spec.first_seen:
                result.never_seen = _open_phase(result, sub, plan, ports, workdir, 0)
        result.peak_rss = rss.peak
        result.peak_pss = rss.peak_pss
        for proc in procs:
            if not proc.alive():
                result.error = f"exited with {proc.popen.returncode} during the run"
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.SubprocessError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if sub is not None:
            sub.stop()
        for proc in procs:
            proc.stop()
        if launch is not None and launch.cleanup is not None:
            launch.cleanup()
    if result.error:
        for proc in procs:
            result.notes.append(f"log tail of {proc.log.name}:\n{proc.tail()}")
    return result


def _warm_fleet(
    result: RoundResult, sub: Subscriber | None, plan: Plan, ports: list[int], workdir: Path
) -> None:
    """One webhook per eSIM of the fleet (seqs 0..iccids-1 are its iccids, each once),
    all acknowledged and, where there is a subscriber, all out on MQTT."""
    tag = new_tag()
    if sub is not None:
        sub.track(tag)
    load = run_load(ports, plan, workdir, tag, mode="closed", duration=plan.ready_timeout,
                    count=plan.iccids)
    if load.ok < plan.iccids:
        raise RuntimeError(f"fleet warm-up: {load.ok} of {plan.iccids} eSIMs acknowledged "
                           f"({load.first_error or 'no answer'})")
    if sub is not None:
        result.lost = len(sub.wait_all(tag, load.seqs, plan.drain_timeout))


def _closed_phase(
    result: RoundResult,
    procs: list[Process],
    sub: Subscriber | None,
    plan: Plan,
    ports: list[int],
    workdir: Path,
) -> None:
    tag = new_tag()
    seen = sub.track(tag) if sub is not None else {}
    cpu_before = sum(cpu_seconds(proc.pid) for proc in procs)
    load = run_load(ports, plan, workdir, tag, mode="closed", duration=plan.duration)
    cpu_after = sum(cpu_seconds(proc.pid) for proc in procs)
    result.rate = load.in_window / load.duration
    result.http_errors += load.errors + load.unanswered
    result.first_error = result.first_error or load.first_error
    result.system_cores = (cpu_after - cpu_before) / load.duration
    result.load_cores = load.cpu_seconds / load.duration
    if sub is None:
        return
    missing = sub.wait_all(tag, load.seqs, plan.drain_timeout)
    arrivals = [seen[s] for s in load.seqs if s in seen]
    result.delivered = len(arrivals)
    result.lost = (result.lost or 0) + len(missing)
    result.drain_timed_out = bool(missing)
    if arrivals:
        result.drain_s = max(0.0, max(arrivals) - load.ended)
        result.delivered_rate = len(arrivals) / (load.duration + result.drain_s)


def _open_phase(
    result: RoundResult,
    sub: Subscriber | None,
    plan: Plan,
    ports: list[int],
    workdir: Path,
    iccids: int,
) -> Latency:
    """The open loop at `plan.rate` over `iccids` eSIMs (0: a new one every webhook)."""
    tag = new_tag()
    seen = sub.track(tag) if sub is not None else {}
    with DuringLoad(workdir) as disk:
        load = run_load(ports, plan, workdir, tag, mode="open", duration=plan.open_duration,
                        rate=plan.rate, iccids=iccids)
    result.http_errors += load.errors + load.unanswered
    result.first_error = result.first_error or load.first_error
    acks = [a - d for a, d in zip(load.acked, load.due, strict=True)]
    last = max(load.acked, default=load.ended)
    latency = Latency(
        ack_p50=_ms(percentile(acks, 50)),
        ack_p99=_ms(percentile(acks, 99)),
        disk_p99=disk.p99(load.started, last),
    )
    if sub is None:
        return latency
    missing = sub.wait_all(tag, load.seqs, min(plan.drain_timeout, 30.0))
    due = dict(zip(load.seqs, load.due, strict=True))
    e2e = [seen[s] - due[s] for s in load.seqs if s in seen]
    latency.e2e_p50 = _ms(percentile(e2e, 50))
    latency.e2e_p99 = _ms(percentile(e2e, 99))
    result.delivered = (result.delivered or 0) + len(e2e)
    result.lost = (result.lost or 0) + len(missing)
    result.duplicates = sub.duplicates
    return latency


def measure_publisher(
    spec: SystemSpec, plan: Plan, mqtt_port: int, workdir: Path, round_no: int
) -> RoundResult:
    """The paho-alone row: a process that publishes for `plan.duration` and exits."""
    result = RoundResult(spec.key, round_no)
    proc = Process(spec.launch(workdir, mqtt_port), workdir / f"{spec.key}.log")
    try:
        with RssSampler(proc.pid) as rss:
            deadline = time.monotonic() + plan.duration + 30
            while proc.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        result.peak_rss = rss.peak
        result.peak_pss = rss.peak_pss
        if proc.alive() or proc.popen.returncode != 0:
            result.error = f"paho-alone did not finish cleanly ({proc.popen.returncode})"
        else:
            line = proc.tail(1)
            result.rate = float(json.loads(line)["rate"])
    except (ValueError, KeyError) as exc:
        result.error = f"unreadable paho-alone output: {exc}"
    finally:
        proc.stop()
    if result.error:
        result.notes.append(f"log tail of {spec.key}:\n{proc.tail()}")
    return result
