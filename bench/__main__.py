"""`python -m bench [--quick] [--scale] [--fleet]`: the bridge against its baselines.

Starts one Mosquitto on a free port, then, round after round, each system in
turn (the order rotates each round so slow drift of the machine does not always
hit the same system), and prints the table also written to
bench/results/latest.md. Exits 0 unless something crashed: numbers never fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from bench.disk import probe
from bench.fleet import ESIMS, run_fleet
from bench.measurement import RoundResult, measure_publisher, measure_webhook_system
from bench.plan import FULL, QUICK, Plan
from bench.report import machine, render, summarize
from bench.scale import run_scale
from bench.system import ROOT, SystemSpec, all_systems
from tests.brokers import Mosquitto

RESULTS = ROOT / "bench" / "results" / "latest.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI size: seconds per system")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="full mode only: also the 10,000 iccids / 100,000 pending messages scenario",
    )
    parser.add_argument(
        "--fleet",
        action="store_true",
        help="full mode only: also the provider sync of a fleet (--only fleet: that alone)",
    )
    parser.add_argument(
        "--fleet-esims",
        type=int,
        default=ESIMS,
        metavar="N",
        help=f"eSIMs of the stand-in provider's account for --fleet (default {ESIMS:,})",
    )
    parser.add_argument("--only", help="comma-separated system keys, e.g. bare,bridge")
    parser.add_argument("--rounds", type=int, help="override the plan's number of rounds")
    parser.add_argument("--duration", type=float, help="override seconds of closed-loop load")
    parser.add_argument("--rate", type=float, help="override the open-loop rate (requests/s)")
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    changes: dict[str, float] = {}
    if args.rounds:
        changes["rounds"] = args.rounds
    if args.duration:
        changes["duration"] = changes["open_duration"] = args.duration
    if args.rate:
        changes["rate"] = args.rate
    return dataclasses.replace(plan, **changes)  # type: ignore[arg-type]


def _measure(spec: SystemSpec, plan: Plan, broker: Mosquitto, workdir: Path, n: int) -> RoundResult:
    started = time.monotonic()
    print(f"  {spec.key:<9} round {n} ...", end="", flush=True)
    measure = measure_webhook_system if spec.webhook else measure_publisher
    result = measure(spec, plan, broker.port, workdir, n)
    took = time.monotonic() - started
    if result.error:
        print(f" FAILED after {took:.1f}s: {result.error}", flush=True)
    else:
        print(f" {result.rate or 0:,.0f}/s, lost {result.lost}, {took:.1f}s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.scale and args.quick:
        print("--scale runs in full mode only; ignoring it for --quick", file=sys.stderr)
        args.scale = False
    if args.only and "fleet" in {k.strip() for k in args.only.split(",")}:
        args.fleet = True
    if args.fleet and args.quick:
        print("--fleet runs in full mode only; ignoring it for --quick", file=sys.stderr)
        args.fleet = False
    plan = _plan(args)
    # Stop cleanly on Ctrl-C and on SIGTERM, even when started from a shell
    # that had SIGINT ignored (a background job): every process gets stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    specs = all_systems(plan.duration)
    if args.only:
        wanted = {k.strip() for k in args.only.split(",")}
        specs = [s for s in specs if s.key in wanted]
    skipped: dict[str, str] = {}
    runnable: list[SystemSpec] = []
    for spec in specs:
        reason = spec.unavailable(plan.quick)
        if reason:
            skipped[spec.label] = reason
            print(f"skipping {spec.key}: {reason}", flush=True)
        else:
            runnable.append(spec)
    machine_line = machine()
    print(f"{plan.name} benchmark on {machine_line}", flush=True)
    results: dict[str, list[RoundResult]] = {s.key: [] for s in runnable}
    extra: list[str] = []
    with tempfile.TemporaryDirectory(prefix="esim-bench-") as tmp:
        workdir = Path(tmp)
        disk_line = probe(workdir, plan.open_duration)
        print(f"disk: {disk_line}", flush=True)
        machine_line += f"; disk: {disk_line}"
        broker = Mosquitto(workdir / "mosquitto").start()
        try:
            for n in range(1, plan.rounds + 1):
                print(f"round {n}/{plan.rounds}", flush=True)
                shift = (n - 1) % max(1, len(runnable))
                for spec in runnable[shift:] + runnable[:shift]:
                    round_dir = workdir / f"{spec.key}-{n}"
                    round_dir.mkdir()
                    results[spec.key].append(_measure(spec, plan, broker, round_dir, n))
            if args.scale and "bridge" in results:
                extra = run_scale(plan, workdir / "scale")
            elif args.scale:
                extra = ["## Scale", "", "Skipped: the bridge is not available."]
            if args.fleet:
                extra += run_fleet(plan, workdir / "fleet", args.fleet_esims)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything", file=sys.stderr)
            return 130
        finally:
            broker.stop()
    summaries = [summarize(spec, results[spec.key]) for spec in runnable]
    report = render(plan, summaries, skipped, machine_line, extra)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print()
    print(report)
    print(f"(written to {RESULTS.relative_to(ROOT)})")
    crashed = any(s.errors for s in summaries) or any("crashed" in line for line in extra)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
