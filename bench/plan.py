"""How long and how hard to push: the quick (CI) plan and the full one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    quick: bool
    rounds: int
    warmup: float  # s of closed-loop load before measuring, not counted
    duration: float  # s of closed-loop load per system and round
    connections: int
    rate: float  # requests/s of the open-loop latency phase
    open_duration: float
    drain_timeout: float  # s to wait for the last acknowledged webhook on MQTT
    ready_timeout: float
    iccids: int  # distinct eSIMs the webhooks cycle through

    @property
    def name(self) -> str:
        return "quick" if self.quick else "full"


QUICK = Plan(
    quick=True,
    rounds=1,
    warmup=0.5,
    duration=2.0,
    connections=32,
    rate=200.0,
    open_duration=2.0,
    drain_timeout=15.0,
    ready_timeout=30.0,
    iccids=100,
)

FULL = Plan(
    quick=False,
    rounds=3,
    warmup=2.0,
    duration=10.0,
    connections=32,
    rate=500.0,
    open_duration=10.0,
    drain_timeout=120.0,
    ready_timeout=60.0,
    iccids=100,
)
