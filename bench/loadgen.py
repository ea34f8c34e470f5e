"""The HTTP load generator, run as its own process: `python -m bench.loadgen`.

Hand-written HTTP/1.1 over asyncio protocols with persistent keep-alive
connections: no dependency, and several times faster than an HTTP client
library, so that on a small machine the generator is not what gets measured.
It runs in its own process so that its CPU does not share a GIL with the
subscriber, and it reports its own CPU use so the harness can say when it may
have been the bottleneck.

Two modes, one connection pool:
- closed: every connection sends its next request as soon as the answer to the
  last one arrives (the ceiling: acknowledged webhooks/s);
- open: requests are due at a fixed rate whether or not earlier ones have been
  answered; latency counts from when a request was due, so a stall is not
  hidden by the generator waiting politely (coordinated omission).

Several `--port`s (replicas of one system): the connections are dealt out among
them in turn, and in the open loop request n goes to port n mod their number, so
each replica takes every other webhook, as behind a round-robin load balancer.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import sys
import time
from array import array
from pathlib import Path
from typing import cast

import msgspec

from bench.webhook import BodyFactory

STALL_TIMEOUT = 30.0


class LoadResult(msgspec.Struct):
    """What one load phase did; `seqs[i]` was due at `due[i]` and acked at `acked[i]`."""

    started: float
    ended: float
    duration: float
    sent: int
    ok: int
    errors: int
    unanswered: int
    in_window: int
    cpu_seconds: float
    seqs: list[int]
    due: list[float]
    acked: list[float]
    first_error: str = ""


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, driver: _Driver, lane: int) -> None:
        self.driver = driver
        self.lane = lane  # which of the ports it is connected to
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.current: tuple[int, float] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def send(self, seq: int, due: float) -> None:
        assert self.transport is not None
        self.current = (seq, due)
        self.transport.write(self.driver.request(seq, self.lane))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            start = end + 4
            marker = head.find(b"content-length:")
            if marker >= 0:
                line_end = head.find(b"\r\n", marker)
                length = int(head[marker + 15 : line_end if line_end >= 0 else None])
                total = start + length
                if len(self.buffer) < total:
                    return
            elif b"transfer-encoding: chunked" in head:
                final = self.buffer.find(b"0\r\n\r\n", start)
                if final < 0:
                    return
                total = final + 5
            else:
                total = start
            status = int(head[9:12])
            del self.buffer[:total]
            done, self.current = self.current, None
            if done is not None:
                self.driver.on_response(self, done[0], done[1], status)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.driver.on_lost(self, exc)


class _Driver:
    """Hands out requests to connections and records what came back."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bodies = BodyFactory(args.tag, args.iccids)
        self.heads = [
            (
                f"POST {args.path} HTTP/1.1\r\nHost: {args.host}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {self.bodies.length}"
                "\r\n\r\n"
            ).encode()
            for port in args.port
        ]
        self.next_seq = 0
        self.seqs = array("q")
        self.due = array("d")
        self.acked = array("d")
        self.errors = 0
        self.first_error = ""
        self.in_flight = 0
        self.stopping = False
        # per port (lane): its idle connections, and its requests waiting for one
        self.idle: list[list[_Connection]] = [[] for _ in args.port]
        self.backlog: list[collections.deque[tuple[int, float]]] = [
            collections.deque() for _ in args.port
        ]
        self.finished = asyncio.get_running_loop().create_future()

    def request(self, seq: int, lane: int) -> bytes:
        return self.heads[lane] + self.bodies.body(seq)

    def waiting(self) -> int:
        return sum(len(backlog) for backlog in self.backlog)

    def _error(self, text: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = text

    def _take(self, lane: int) -> tuple[int, float] | None:
        """The next request for a free connection of `lane`, or None to leave it idle."""
        if self.backlog[lane]:
            return self.backlog[lane].popleft()
        if self.args.mode == "closed" and not self.stopping:
            if self.args.count and self.next_seq >= self.args.count:
                return None
            seq = self.next_seq
            self.next_seq += 1
            return seq, time.monotonic()
        return None

    def dispatch(self, conn: _Connection) -> None:
        job = self._take(conn.lane)
        if job is None:
            self.idle[conn.lane].append(conn)
            if self.in_flight == 0 and self._done_sending() and not self.finished.done():
                self.finished.set_result(None)
            return
        self.in_flight += 1
        conn.send(*job)

    def _done_sending(self) -> bool:
        if self.waiting():
            return False
        if self.args.mode == "closed":
            return self.stopping or bool(self.args.count and self.next_seq >= self.args.count)
        return self.stopping

    def enqueue(self, seq: int, due: float) -> None:
        lane = seq % len(self.idle)
        if self.idle[lane]:
            self.in_flight += 1
            self.idle[lane].pop().send(seq, due)
        else:
            self.backlog[lane].append((seq, due))

    def on_response(self, conn: _Connection, seq: int, due: float, status: int) -> None:
        now = time.monotonic()
        self.in_flight -= 1
        if status == 200:
            self.seqs.append(seq)
            self.due.append(due)
            self.acked.append(now)
        else:
            self._error(f"HTTP {status} for seq {seq}")
        self.dispatch(conn)

    def on_lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn.current is not None:
            self.in_flight -= 1
            self._error(f"connection lost with a request in flight: {exc!r}")
            conn.current = None
        if conn in self.idle[conn.lane]:
            self.idle[conn.lane].remove(conn)

    def stop(self) -> None:
        self.stopping = True
        if self.in_flight == 0 and not self.waiting() and not self.finished.done():
            self.finished.set_result(None)


async def _open_loop_feed(driver: _Driver, start: float, rate: float, total: int) -> None:
    """Makes requests due at `rate`/s; a slow server gets a backlog, not a pause."""
    for seq in range(total):
        due = start + seq / rate
        delay = due - time.monotonic()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        driver.enqueue(seq, due)
    driver.next_seq = total


async def run(args: argparse.Namespace) -> LoadResult:
    loop = asyncio.get_running_loop()
    driver = _Driver(args)
    conns: list[_Connection] = []
    for n in range(args.connections):
        lane = n % len(args.port)
        _, conn = await loop.create_connection(
            functools.partial(_Connection, driver, lane), args.host, args.port[lane]
        )
        conns.append(conn)
    cpu_start = time.process_time()
    started = time.monotonic()
    feeder: asyncio.Task[None] | None = None
    if args.mode == "closed":
        for conn in conns:
            driver.dispatch(conn)
        if args.count:
            # --duration caps a count run, so a server that stalls cannot hang the harness
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(driver.finished), args.duration)
        else:
            await asyncio.sleep(args.duration)
    else:
        for conn in conns:
            driver.idle[conn.lane].append(conn)
        total = int(args.rate * args.duration)
        feeder = asyncio.create_task(_open_loop_feed(driver, started, args.rate, total))
        await feeder
    window_end = time.monotonic()
    cpu_end = time.process_time()
    driver.stop()
    unanswered = 0
    try:
        await asyncio.wait_for(asyncio.shield(driver.finished), STALL_TIMEOUT)
    except TimeoutError:
        unanswered = driver.in_flight + driver.waiting()
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    duration = window_end - started
    acked = driver.acked.tolist()
    in_window = sum(1 for t in acked if t <= window_end)
    return LoadResult(
        started=started,
        ended=window_end,
        duration=duration,
        sent=driver.next_seq,
        ok=len(acked),
        errors=driver.errors,
        unanswered=unanswered,
        in_window=in_window,
        cpu_seconds=cpu_end - cpu_start,
        seqs=driver.seqs.tolist(),
        due=driver.due.tolist(),
        acked=acked,
        first_error=driver.first_error,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, nargs="+", required=True,
                        help="several: replicas of one system, taking requests in turn")
    parser.add_argument("--path", default="/webhook")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--count", type=int, default=0, help="closed mode: stop after N requests")
    parser.add_argument("--rate", type=float, default=500.0, help="open mode: requests/s")
    parser.add_argument("--tag", type=lambda s: int(s, 0), required=True)
    parser.add_argument("--iccids", type=int, default=100, help="0: a new one every request")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    args.out.write_bytes(msgspec.msgpack.encode(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
