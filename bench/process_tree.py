"""Memory and CPU of a process and all its descendants, read from /proc.

A system under test may be a wrapper that forks (uvicorn, node), so its cost is
the whole tree. /proc instead of psutil: no dependency for a few numbers.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant."""
    pids = [pid]
    index = 0
    while index < len(pids):
        pids.extend(_children(pids[index]))
        index += 1
    return pids


def rss_bytes(pid: int) -> int:
    """Resident memory of the tree: the sum of VmRSS (shared pages count twice)."""
    total = 0
    for member in tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def pss_bytes(pid: int) -> int:
    """Proportional memory of the tree: each shared page divided among its sharers, so a
    tree of two interpreters is not charged twice for the same library pages."""
    total = 0
    for member in tree(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the live tree has used so far."""
    ticks = 0
    for member in tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / _CLOCK_TICKS


class RssSampler:
    """Polls the tree's RSS in a thread and keeps the peak and a time series; given several
    pids (replicas of one system), the sum over their trees."""

    def __init__(self, *pids: int, interval: float = 0.1) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = 0
        self.peak_pss = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        value = sum(rss_bytes(pid) for pid in self.pids)
        if value:
            self.samples.append((time.monotonic(), value))
            self.peak = max(self.peak, value)
            self.peak_pss = max(self.peak_pss, sum(pss_bytes(pid) for pid in self.pids))
        return value

    def at(self, when: float) -> int:
        """The last sample taken at or before `when` (monotonic), or 0."""
        best = 0
        for stamp, value in self.samples:
            if stamp > when:
                break
            best = value
        return best
