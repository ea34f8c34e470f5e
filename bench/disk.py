"""How this disk answers fsync, which every acknowledgement of the bridge waits for.

A shared VM's disk can answer in 0.3 ms for seconds and then hold one fsync for
50 ms; at 500/s such a stall holds up 25 webhooks, and two of them make the ACK
p99. So the bench probes the disk twice: alone before the rounds (`probe`), and
beside every latency phase (`DuringLoad`, a process of its own so that it shares
no GIL with the subscriber), whose p99 is printed next to the ACK p99: a tail
that the disk had too is the disk's.

`python -m bench.disk DIR INTERVAL` appends and fsyncs 13 KB (about what one
webhook costs the store) every INTERVAL seconds until its stdin closes, then
prints `[[monotonic time, ms], ...]` as JSON.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from bench.stats import percentile

STALL_MS = 10.0  # an fsync slower than this is a stall: at 500/s, five webhooks wait
CHUNK = b"x" * 13_000
ALONE_INTERVAL = 0.002  # before the rounds: the rate of a bridge fsyncing every webhook
BESIDE_INTERVAL = 0.01  # during a latency phase: light enough not to make the tail it shows


def _fsyncs(directory: Path, interval: float, stop: float | None) -> list[tuple[float, float]]:
    """(when, ms) of each fsync until `stop` (monotonic) or, with None, stdin's EOF."""
    path = directory / f"fsync-probe-{os.getpid()}"
    took: list[tuple[float, float]] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while stop is None or time.monotonic() < stop:
            os.write(fd, CHUNK)
            started = time.perf_counter()
            os.fsync(fd)
            took.append((time.monotonic(), (time.perf_counter() - started) * 1000))
            if stop is not None:
                time.sleep(interval)
            elif select.select([sys.stdin], [], [], interval)[0]:
                break  # stdin readable: closed by the harness
    finally:
        os.close(fd)
        path.unlink()
    return took


def probe(directory: Path, seconds: float) -> str:
    """The disk alone, before the rounds, for as long as a latency phase lasts."""
    took = sorted(ms for _, ms in _fsyncs(directory, ALONE_INTERVAL, time.monotonic() + seconds))
    stalls = sum(1 for ms in took if ms > STALL_MS)
    return (
        f"fsync of 13 KB every {ALONE_INTERVAL * 1000:g} ms for {seconds:g} s, alone: "
        f"p50 {percentile(took, 50):.2f} ms, p99 {percentile(took, 99):.2f} ms, "
        f"max {took[-1]:.1f} ms, {stalls} over {STALL_MS:.0f} ms"
    )


class DuringLoad:
    """Probes the disk while a load phase runs; `p99(start, end)` reads the window."""

    def __init__(self, directory: Path) -> None:
        argv = [sys.executable, "-m", "bench.disk", str(directory), str(BESIDE_INTERVAL)]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        self._took: list[tuple[float, float]] = []

    def __enter__(self) -> DuringLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            out, _ = self._proc.communicate("", timeout=10)
            self._took = [(t, ms) for t, ms in json.loads(out or "[]")]
        except (subprocess.TimeoutExpired, ValueError):
            self._proc.kill()
            self._proc.wait()

    def window(self, start: float, end: float) -> list[float]:
        """The fsyncs (ms) that ended between `start` and `end` (monotonic)."""
        return [ms for t, ms in self._took if start <= t <= end]

    def p99(self, start: float, end: float) -> float | None:
        """p99 of the fsyncs that ended between `start` and `end` (monotonic), in ms."""
        return percentile(self.window(start, end), 99)


if __name__ == "__main__":
    print(json.dumps(_fsyncs(Path(sys.argv[1]), float(sys.argv[2]), None)))
