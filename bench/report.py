"""The markdown report: one row per system, ratios against the baselines.

Ratios are the point: the machines are shared and noisy, so the bridge is only
ever compared with baselines measured minutes apart under the same load. The
issue's targets are printed beside the ratios as met / not met, for reading,
never as an exit code.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.disk import BESIDE_INTERVAL
from bench.measurement import Latency, RoundResult
from bench.plan import Plan
from bench.stats import median
from bench.system import SystemSpec
from tests.brokers import mosquitto_binary

MSGS_PER_WEBHOOK = 7  # the bridge's topics for one DATA_USAGE webhook (CONTRACT.md)
LOADGEN_BUSY = 0.8  # cores; above this the load generator may be what limits the rate


@dataclass
class Summary:
    """One system's rounds folded into a row: medians, except peaks and counts."""

    spec: SystemSpec
    rounds: list[RoundResult]
    rate: float | None = None
    warm: Latency = field(default_factory=Latency)
    never_seen: Latency | None = None
    drain: float | None = None
    drain_timed_out: bool = False
    delivered_rate: float | None = None
    ready: float | None = None
    system_cores: float | None = None
    load_cores: float | None = None
    peak_rss: int = 0
    peak_pss: int = 0
    lost: int | None = None
    delivered: int | None = None
    http_errors: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)


def summarize(spec: SystemSpec, rounds: list[RoundResult]) -> Summary:
    ok = [r for r in rounds if r.error is None]
    s = Summary(spec, rounds)
    s.errors = [f"round {r.round}: {r.error}" for r in rounds if r.error]
    s.rate = median([r.rate for r in ok])
    s.warm = _median_latency([r.warm for r in ok])
    never_seen = [r.never_seen for r in ok if r.never_seen is not None]
    s.never_seen = _median_latency(never_seen) if never_seen else None
    s.drain = median([r.drain_s for r in ok])
    s.drain_timed_out = any(r.drain_timed_out for r in ok)
    s.delivered_rate = median([r.delivered_rate for r in ok])
    s.ready = median([r.ready_s for r in ok])
    s.system_cores = median([r.system_cores for r in ok])
    s.load_cores = median([r.load_cores for r in ok])
    s.peak_rss = max((r.peak_rss for r in rounds), default=0)
    s.peak_pss = max((r.peak_pss for r in rounds), default=0)
    losts = [r.lost for r in rounds if r.lost is not None]
    s.lost = sum(losts) if losts else None
    delivered = [r.delivered for r in rounds if r.delivered is not None]
    s.delivered = sum(delivered) if delivered else None
    s.http_errors = sum(r.http_errors for r in rounds)
    s.duplicates = sum(r.duplicates for r in rounds)
    return s


def _median_latency(phases: Sequence[Latency]) -> Latency:
    return Latency(*(median([getattr(p, f.name) for p in phases])
                     for f in dataclasses.fields(Latency)))


def _num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def _pair(a: float | None, b: float | None) -> str:
    if a is None and b is None:
        return "—"
    return f"{_num(a, 1)} / {_num(b, 1)}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}x"


def _pair_vs(a: float | None, b: float | None, base: float | None) -> str:
    """p50 / p99, and the p99 against `base` (the same system's warm-fleet p99)."""
    ratio = _ratio(b, base)
    return _pair(a, b) + ("" if ratio == "—" else f" ({ratio})")


def machine() -> str:
    model = ""
    try:
        for line in open("/proc/cpuinfo").read().splitlines():  # noqa: SIM115
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = [f"Python {platform.python_version()}"]
    binary = mosquitto_binary()
    if binary:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False)
        first = (out.stdout or out.stderr).splitlines()[:1]
        versions += [first[0].replace(" running on", "").strip()] if first else []
    node = shutil.which("node")
    if node:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
        versions.append(f"node {out.stdout.strip()}")
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({model or platform.machine()}), "
        f"{platform.system()} {platform.release()}; {', '.join(versions)}; "
        f"load average at start {load[0]:.2f}"
    )


def render(
    plan: Plan,
    summaries: Sequence[Summary],
    skipped: dict[str, str],
    machine_line: str,
    extra: Sequence[str] = (),
) -> str:
    by_key = {s.spec.key: s for s in summaries}
    bare = by_key.get("bare")
    red = by_key.get("node-red")
    bare_rate = bare.rate if bare else None
    red_rate = red.rate if red else None
    rate = f"@{plan.rate:.0f}/s"
    lines = [
        f"# esim-bridge benchmark ({plan.name}), {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"Machine: {machine_line}.",
        "",
        f"Load: DATA_USAGE webhook, unique notifyIds over {plan.iccids} iccids; closed loop "
        f"at {plan.connections} keep-alive connections for {plan.duration:g} s after a "
        f"{plan.warmup:g} s warm-up; open loop {rate} for {plan.open_duration:g} s; "
        f"{plan.rounds} interleaved round(s), medians. Each system is a fresh process on one "
        "Mosquitto and has seen every eSIM of the fleet once before anything is measured. "
        "Only the ratios mean anything: absolute numbers move with the machine and its "
        "neighbours.",
        "",
        "Disk fsync p99: 13 KB appended and fsynced every "
        f"{BESIDE_INTERVAL * 1000:g} ms by a probe during that row's latency phase; an ACK "
        "tail the disk had too is the disk's. Never-seen eSIMs: the latency phase again, "
        "a new iccid in every webhook (for the bridge, a Home Assistant discovery config "
        "each); in brackets its p99 against the warm fleet's just above.",
        "",
        f"| system | webhooks/s acked | vs bare | vs Node-RED | ACK p50/p99 ms {rate} "
        f"| disk fsync p99 ms | e2e p50/p99 ms {rate} | drain s | peak RSS / PSS MB | lost |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        webhook = s.spec.webhook
        if s.rate is None:
            acked = "**failed**"
        elif webhook:
            acked = _num(s.rate)
        else:
            acked = f"{_num(s.rate)} msgs/s"
        lost = "—" if s.lost is None else ("0" if s.lost == 0 else f"**{s.lost} LOST**")
        drain = _num(s.drain, 2)
        if s.drain_timed_out:
            drain = f"> {plan.drain_timeout:g} (timed out)"
        warm, new = s.warm, s.never_seen
        lines.append(
            f"| {s.spec.label} | {acked} "
            f"| {_ratio(s.rate, bare_rate) if webhook else '—'} "
            f"| {_ratio(s.rate, red_rate) if webhook else '—'} "
            f"| {_pair(warm.ack_p50, warm.ack_p99) if webhook else '—'} "
            f"| {_num(warm.disk_p99, 1)} "
            f"| {_pair(warm.e2e_p50, warm.e2e_p99)} | {drain} "
            f"| {_num(s.peak_rss / 1e6 if s.peak_rss else None, 1)} / "
            f"{_num(s.peak_pss / 1e6 if s.peak_pss else None, 1)} | {lost} |"
        )
        if new is not None:
            lines.append(
                f"| ↳ never-seen eSIMs {rate} | | | "
                f"| {_pair_vs(new.ack_p50, new.ack_p99, warm.ack_p99)} "
                f"| {_num(new.disk_p99, 1)} "
                f"| {_pair_vs(new.e2e_p50, new.e2e_p99, warm.e2e_p99)} | | | |"
            )
    for key, reason in skipped.items():
        lines.append(f"| {key} | skipped: {reason} | | | | | | | | |")
    lines += ["", *_targets(plan, by_key, bare_rate, red_rate), *_on_postgres(plan, by_key)]
    lines += ["", *_diagnostics(summaries)]
    if extra:
        lines += ["", *extra]
    errors = [f"- {s.spec.label}: {e}" for s in summaries for e in s.errors]
    if errors:
        lines += ["", "## Crashes", "", *errors]
        for s in summaries:
            for r in s.rounds:
                lines += ["", "```", *r.notes, "```"] if r.notes else []
    return "\n".join(lines) + "\n"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def _targets(
    plan: Plan, by_key: dict[str, Summary], bare: float | None, red: float | None
) -> list[str]:
    bridge = by_key.get("bridge")
    lines = ["## The issue's targets (informational, never a failure)", ""]
    if bridge is None or bridge.rate is None:
        return [*lines, "The bridge did not run, so there is nothing to compare."]
    at = "" if plan.rate == 500 else f" (measured at {plan.rate:.0f}/s)"
    warm = bridge.warm
    rss_mb = bridge.peak_rss / 1e6 if bridge.peak_rss else None
    pss_mb = bridge.peak_pss / 1e6 if bridge.peak_pss else None

    def row(target: str, measured: str, ok: bool | None) -> str:
        return f"| {target} | {measured} | {_verdict(ok)} |"

    def le(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    red_ratio = bridge.rate / red if red else None
    bare_ratio = bridge.rate / bare if bare else None
    if bare and red and bare / red < 2.5:
        lines += [
            f"Note: bare Litestar itself is only {bare / red:.2f}x Node-RED here, so "
            "≥ 2.5x Node-RED is out of reach for a Litestar-based bridge on this machine.",
            "",
        ]
    return [
        *lines,
        "| target | measured | |",
        "| --- | ---: | --- |",
        row(
            "≥ 2.5x Node-RED webhooks/s",
            _ratio(bridge.rate, red),
            None if red_ratio is None else red_ratio >= 2.5,
        ),
        row(
            "≥ 90 % of bare Litestar webhooks/s",
            _num(None if bare_ratio is None else bare_ratio * 100, 0, " %"),
            None if bare_ratio is None else bare_ratio >= 0.9,
        ),
        row(f"e2e p99 ≤ 10 ms @500/s{at}", _num(warm.e2e_p99, 1, " ms"), le(warm.e2e_p99, 10)),
        row(
            f"ACK p99 ≤ 5 ms @500/s{at}",
            f"{_num(warm.ack_p99, 1, ' ms')} (disk's fsync p99 {_num(warm.disk_p99, 1, ' ms')})",
            le(warm.ack_p99, 5),
        ),
        row("peak RSS ≤ 80 MB (sum over the process tree)", _num(rss_mb, 1, " MB"),
            le(rss_mb, 80)),
        row("peak PSS ≤ 80 MB (shared pages counted once)", _num(pss_mb, 1, " MB"),
            le(pss_mb, 80)),
        row(
            "≥ 1000 webhooks/s delivered end to end",
            _num(bridge.delivered_rate, 0, "/s"),
            None if bridge.delivered_rate is None else bridge.delivered_rate >= 1000,
        ),
        *_without_fsync(by_key.get("bridge-normal"), at),
    ]


def _without_fsync(normal: Summary | None, at: str) -> list[str]:
    """The latencies again with `store.synchronous = "normal"`: how much of the tail is
    the disk's fsync rather than the bridge's own work."""
    if normal is None or normal.warm.ack_p99 is None:
        return []
    return [
        "",
        f'With `store.synchronous = "normal"` (no fsync per acknowledgement, not the '
        f"default): ACK p99 {_num(normal.warm.ack_p99, 1, ' ms')}, e2e p99 "
        f"{_num(normal.warm.e2e_p99, 1, ' ms')} @500/s{at}.",
    ]


def _on_postgres(plan: Plan, by_key: dict[str, Summary]) -> list[str]:
    """The rows on PostgreSQL (`store.url`) against the bridge on SQLite of the same run,
    and two replicas against one."""
    rows = [by_key[key] for key in ("bridge-pg", "bridge-pg2") if key in by_key]
    if not rows:
        return []
    sqlite, one = by_key.get("bridge"), by_key.get("bridge-pg")
    lines = [
        "",
        "## On PostgreSQL (`store.url`)",
        "",
        "Against esim-bridge on SQLite measured in the same run. With replicas, the "
        "webhooks go to each in turn and each is counted once at the subscriber, whichever "
        "replica published it (messages published more than once: dup msgs, below).",
        "",
        f"| system | webhooks/s vs SQLite | vs one on PostgreSQL | ACK p99 vs SQLite "
        f"@{plan.rate:.0f}/s | e2e p99 vs SQLite |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    base = sqlite.warm if sqlite else Latency()
    for s in rows:
        lines.append(
            f"| {s.spec.label} | {_ratio(s.rate, sqlite.rate if sqlite else None)} "
            f"| {_ratio(s.rate, one.rate if one and s is not one else None)} "
            f"| {_ratio(s.warm.ack_p99, base.ack_p99)} | {_ratio(s.warm.e2e_p99, base.e2e_p99)} |"
        )
    if sqlite is None:
        lines += ["", "(Run the bridge row too, `--only bridge,bridge-pg,bridge-pg2`, for the "
                  "ratios against SQLite.)"]
    return lines


def _diagnostics(summaries: Sequence[Summary]) -> list[str]:
    lines = [
        "## Diagnostics",
        "",
        "CPU is cores busy during the closed loop (system's process tree / load generator). "
        "Delivered/s is webhooks seen on MQTT per second of load plus drain.",
        "",
        "| system | ready s | CPU system | CPU loadgen | delivered/s | HTTP errors | dup msgs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    busiest = 0.0
    for s in summaries:
        if not s.spec.webhook:
            continue
        busiest = max(busiest, s.load_cores or 0.0)
        first = next((r.first_error for r in s.rounds if r.first_error), "")
        errors = str(s.http_errors) + (f" ({first})" if first else "")
        lines.append(
            f"| {s.spec.label} | {_num(s.ready, 2)} | {_num(s.system_cores, 2)} "
            f"| {_num(s.load_cores, 2)} | {_num(s.delivered_rate)} | {errors} "
            f"| {s.duplicates} |"
        )
    lines.append("")
    if busiest > LOADGEN_BUSY:
        lines.append(
            f"**Warning:** the load generator used up to {busiest:.2f} cores; it may have "
            "limited the fastest rows."
        )
    else:
        lines.append(
            f"The load generator used at most {busiest:.2f} cores: it was not the bottleneck."
        )
    by_key = {s.spec.key: s for s in summaries}
    bridge, paho = by_key.get("bridge"), by_key.get("paho")
    if bridge and paho and bridge.delivered_rate and paho.rate:
        msgs = bridge.delivered_rate * MSGS_PER_WEBHOOK
        lines.append(
            f"The bridge publishes ~{MSGS_PER_WEBHOOK} MQTT messages per webhook: at its "
            f"delivered rate that is ~{msgs:,.0f} msgs/s, {msgs / paho.rate:.0%} of what one "
            "paho client alone gets acknowledged."
        )
    return lines
