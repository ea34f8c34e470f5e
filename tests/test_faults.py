"""The guarantees under the faults real deployments see, end to end.

Each test runs the real `esim-bridge serve` against a real Mosquitto and then breaks
something: the broker is down, restarts empty, stalls; the bridge is killed with
SIGKILL or stopped with SIGTERM under load; the store is locked or its disk is full.
What is checked is what a user relies on: every webhook answered 200 reaches the event
topics (duplicates allowed, losses not), in order per eSIM, and the retained state is
right.

Some tests freeze the bridge and its publisher (SIGSTOP) for a moment: while the broker
comes back, so that the test's own subscriber is listening before the bridge reconnects
(a broker without persistence keeps nothing for a subscriber that is not there yet), and
before the broker is killed, so that the broker has passed on all it acknowledged (what a
dying broker loses after its PUBACK is not the bridge's to prove).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import Mosquitto
from tests.processes import BridgeProcess, Watcher, fixture, request, retained
from tests.stores import Place

pytestmark = pytest.mark.timeout(150)

EVENTS = "esim/event/DATA_USAGE"
EPOCH = datetime(2025, 7, 21, 10, 0, tzinfo=UTC)
TOTAL = 53687091200


# -- webhooks --------------------------------------------------------------------------------


class Hook:
    """One DATA_USAGE webhook for `iccid`; `seq` makes its notifyId, time and values unique."""

    def __init__(self, tag: str, iccid: str, seq: int) -> None:
        self.iccid = iccid
        self.notify_id = f"{tag}-{seq:05d}"
        self.remain = TOTAL - 1000 * (seq + 1)
        body = json.loads(fixture("data_usage"))
        body["notifyId"] = self.notify_id
        body["eventGenerateTime"] = (EPOCH + timedelta(seconds=seq)).strftime("%Y-%m-%dT%H:%M:%SZ")
        body["content"].update(iccid=iccid, remain=self.remain, orderUsage=TOTAL - self.remain)
        self.body = json.dumps(body).encode()


def hooks(tag: str, iccids: list[str], count: int, start: int = 0) -> list[Hook]:
    """`count` webhooks spread round-robin over `iccids`."""
    return [Hook(tag, iccids[i % len(iccids)], start + i) for i in range(count)]


def iccids(prefix: str, count: int) -> list[str]:
    return [f"8943{prefix}{i:06d}" for i in range(count)]


class Poster:
    """Posts webhooks from threads, one thread per eSIM group, and records every answer.

    Each eSIM's webhooks go through one thread, one after the other, so the order
    acknowledged for an eSIM is the order it was posted in. A thread stops at its first
    connection error when `stop_on_error` (the bridge went away).

    Given several bridges (replicas), each thread posts to them in turn, and a webhook
    that finds one gone is posted to the next, as a load balancer would.
    """

    def __init__(self, bridge: BridgeProcess | Sequence[BridgeProcess], batch: list[Hook],
                 threads: int = 4, stop_on_error: bool = False, timeout: float = 30.0) -> None:
        bridges = [bridge] if isinstance(bridge, BridgeProcess) else list(bridge)
        self.urls = [b.url for b in bridges]
        self.batch = batch
        self.stop_on_error = stop_on_error
        self.timeout = timeout
        self.answers: dict[str, tuple[int, Any, dict[str, str]]] = {}  # notifyId -> answer
        self.acked: list[Hook] = []  # in the order the 200s came back
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        owner: dict[str, int] = {}
        for hook in batch:
            owner.setdefault(hook.iccid, len(owner) % threads)
        lanes = [[h for h in batch if owner[h.iccid] == i] for i in range(threads)]
        self._threads = [
            threading.Thread(target=self._post, args=(lane,), daemon=True) for lane in lanes if lane
        ]

    def start(self) -> Poster:
        for thread in self._threads:
            thread.start()
        return self

    def join(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "the posting threads hung"

    def _post(self, batch: list[Hook]) -> None:
        urls = self.urls
        for n, hook in enumerate(batch):
            for turn in range(len(urls)):
                outcome = self._post_one(urls[(n + turn) % len(urls)], hook)
                if outcome[0] != 0:
                    break
            with self._cond:
                self.answers[hook.notify_id] = outcome
                if outcome[0] == 200:
                    self.acked.append(hook)
                self._cond.notify_all()
            if outcome[0] == 0 and self.stop_on_error:
                return

    def _post_one(self, url: str, hook: Hook) -> tuple[int, Any, dict[str, str]]:
        try:
            answer = request(url, hook.body, timeout=self.timeout)
        except OSError as exc:  # refused, reset: no answer
            return (0, repr(exc), {})
        try:
            body = answer.json()
        except ValueError:
            body = answer.body
        return (answer.status, body, answer.headers)

    def wait_acked(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.acked) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.acked)} of {count} webhooks acknowledged")
                self._cond.wait(left)

    def unanswered(self) -> list[Hook]:
        """Webhooks whose request failed without an answer: they may or may not be stored."""
        with self._lock:
            return [h for h in self.batch if self.answers.get(h.notify_id, (None,))[0] == 0]

    def statuses(self) -> dict[int, int]:
        with self._lock:
            counts: dict[int, int] = {}
            for status, _, _ in self.answers.values():
                counts[status] = counts.get(status, 0) + 1
            return counts


# -- what the subscribers saw ----------------------------------------------------------------


def notify_ids(messages: list[tuple[str, bytes, bool]], topic: str) -> list[str]:
    return [json.loads(p)["notifyId"] for t, p, _ in messages if t == topic]


def first_seen(ids: list[str]) -> list[str]:
    """The sequence with at-least-once duplicates removed (first delivery counts)."""
    seen: set[str] = set()
    out = []
    for notify_id in ids:
        if notify_id not in seen:
            seen.add(notify_id)
            out.append(notify_id)
    return out


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not after {timeout}s")
        time.sleep(0.05)


def wait_for_events(watchers: list[Watcher], wanted: set[str], timeout: float = 60.0) -> None:
    """Until every notifyId in `wanted` was seen on the event topic by one of `watchers`."""

    def missing() -> set[str]:
        seen: set[str] = set()
        for w in watchers:
            seen.update(notify_ids(list(w.messages), EVENTS))
        return wanted - seen

    try:
        wait_until(lambda: not missing(), "every acknowledged event on MQTT", timeout)
    except TimeoutError:
        lost = sorted(missing())
        raise AssertionError(f"{len(lost)} acknowledged events never came: {lost[:10]}") from None


def assert_delivered(
    messages: list[tuple[str, bytes, bool]], acked: list[Hook], unanswered: Sequence[Hook] = ()
) -> None:
    """Every acknowledged webhook on both event topics, and per eSIM in acknowledged order.

    `unanswered` are webhooks that got no answer (the bridge died or stopped while they were in
    flight): they may arrive or not. Nothing else may.
    """
    wanted = [h.notify_id for h in acked]
    maybe = ids(unanswered)
    on_type = notify_ids(messages, EVENTS)
    lost = [n for n in wanted if n not in set(on_type)]
    assert not lost, f"{len(lost)} acknowledged events missing on {EVENTS}: {lost[:10]}"
    strangers = set(on_type) - set(wanted) - maybe
    assert not strangers, f"published but never acknowledged: {sorted(strangers)[:10]}"
    by_esim: dict[str, list[str]] = {}
    for hook in acked:
        by_esim.setdefault(hook.iccid, []).append(hook.notify_id)
    for iccid, expected in by_esim.items():
        got = first_seen(notify_ids(messages, f"esim/{iccid}/event"))
        assert [n for n in got if n not in maybe] == expected, (
            f"esim/{iccid}/event: order or content differs from the acknowledgements"
        )
        # its retained state too: every value it took, in order, none skipped after an
        # outage, and never a newer one before an older one (values of webhooks from
        # before these, retained on the broker when the subscriber came, aside)
        states = [json.loads(p)["last_notify_id"] for t, p, _ in messages
                  if t == f"esim/{iccid}/state"]
        assert [n for n in first_seen(states) if n in set(expected)] == expected, (
            f"esim/{iccid}/state: a value skipped or out of order"
        )


def assert_retained_state(
    port: int, acked: list[Hook], unanswered: Sequence[Hook] = (), online: bool = True
) -> None:
    """A fresh subscriber sees each eSIM's latest state, and the bridge online.

    The latest is the last acknowledged webhook for the eSIM, or a later one that got no
    answer (stored, but the bridge died before it could say so)."""
    held = retained(port, "esim/#", wait=1.0)
    if online:
        assert held.get("esim/bridge/state") == b"online"
    latest = {h.iccid: h for h in acked}
    later = {h.notify_id: h for h in unanswered}
    for iccid, last in latest.items():
        assert f"esim/{iccid}/state" in held, f"retained esim/{iccid}/state is gone"
        state = json.loads(held[f"esim/{iccid}/state"])
        hook = later.get(state["last_notify_id"], last)
        assert hook.iccid == iccid and state["last_notify_id"] == hook.notify_id, (iccid, state)
        assert state["data_remaining"] == hook.remain, iccid
        assert held[f"esim/{iccid}/data_remaining"] == str(hook.remain).encode(), iccid


# -- processes -------------------------------------------------------------------------------


def family(pid: int) -> list[int]:
    """`pid` and its descendants (the bridge may run its publisher as a child process)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def _signal_family(bridge: BridgeProcess, signum: int) -> None:
    if bridge.proc is None or bridge.proc.poll() is not None:
        return
    for pid in family(bridge.proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def freeze(bridge: BridgeProcess) -> None:
    _signal_family(bridge, signal.SIGSTOP)


def thaw(bridge: BridgeProcess) -> None:
    _signal_family(bridge, signal.SIGCONT)


@contextlib.contextmanager
def frozen(bridge: BridgeProcess) -> Iterator[None]:
    """The bridge stopped (SIGSTOP) for the block: it cannot reconnect before the test's
    subscriber does. Requests sent meanwhile wait in the kernel."""
    freeze(bridge)
    try:
        yield
    finally:
        thaw(bridge)


def crash(broker: Mosquitto) -> None:
    """SIGKILL: the broker dies at once, with whatever it had not processed yet."""
    assert broker.proc is not None
    broker.proc.kill()
    broker.proc.wait(10)
    broker.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto that is not started yet: each test decides when it runs."""
    mosquitto = Mosquitto(tmp_path / "mosquitto")
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


@pytest.fixture
def make_bridge(tmp_path: Path) -> Iterator[Callable[..., BridgeProcess]]:
    """Builds bridges (not started) and stops every one of them at the end."""
    made: list[BridgeProcess] = []

    def make(url: str, db: Place | None = None, **sections: dict[str, Any]) -> BridgeProcess:
        """`db`: the store, a SQLite file or a PostgreSQL URL (else one in its folder)."""
        sections.setdefault("homeassistant", {"discovery": False})
        if db is not None:
            sections.setdefault("store", {})["path" if isinstance(db, Path) else "url"] = str(db)
        process = BridgeProcess(tmp_path / f"bridge{len(made)}", url, sections)
        made.append(process)
        return process

    try:
        yield make
    finally:
        for process in made:
            thaw(process)
            process.stop()


def outbox_rows(path: Path) -> int:
    """How many messages wait in a (stopped) bridge's outbox."""
    conn = sqlite3.connect(path)
    try:
        count: int = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return count
    finally:
        conn.close()


def backlog(bridge: BridgeProcess) -> float:
    """The outbox backlog, as /metrics reports it."""
    for line in bridge.get("/metrics").body.decode().splitlines():
        if line.startswith("esim_bridge_outbox_backlog "):
            return float(line.split()[1])
    raise AssertionError("esim_bridge_outbox_backlog is not in /metrics")


def header(answer: Any, name: str) -> str | None:
    return next((v for k, v in answer.headers.items() if k.lower() == name.lower()), None)


def read_status(sock: socket.socket) -> int:
    """The status code of the HTTP response that arrives on `sock`."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    return int(data.split(b" ", 2)[1])


def ids(batch: Sequence[Hook]) -> set[str]:
    return {h.notify_id for h in batch}


# -- 1. the broker is down when the bridge starts ---------------------------------------------


def test_broker_down_at_start_acks_then_delivers(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess]
) -> None:
    bridge = make_bridge(broker.url).start(wait_ready=False)
    ready = bridge.get("/readyz")
    assert ready.status == 503
    reasons = ready.json()["reasons"]
    assert any("MQTT broker" in r and f":{broker.port}" in r for r in reasons), reasons

    batch = hooks("down", iccids("01", 5), 60)
    poster = Poster(bridge, batch).start()
    poster.join()
    assert poster.statuses() == {200: len(batch)}
    assert all(poster.answers[h.notify_id][1] == {"ok": True} for h in batch)
    assert bridge.get("/readyz").status == 503

    with frozen(bridge):
        broker.start()
        watcher = Watcher(broker.port, ["esim/#"])
    try:
        wait_for_events([watcher], ids(batch))
        bridge.wait_ready()
        watcher.settle()
        assert_delivered(list(watcher.messages), poster.acked)
    finally:
        watcher.close()
    assert_retained_state(broker.port, poster.acked)


# -- 2. the broker restarts empty in the middle of a stream -----------------------------------


def test_broker_restart_without_persistence_mid_stream(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess]
) -> None:
    broker.start()
    bridge = make_bridge(broker.url).start()
    early = hooks("early", iccids("02", 3), 6)  # eSIMs heard of only before the outage
    batch = hooks("stream", iccids("03", 8), 600, start=100)

    before = Watcher(broker.port, ["esim/#"])
    try:
        for hook in early:
            assert bridge.post(hook.body).status == 200
        wait_for_events([before], ids(early))
        poster = Poster(bridge, batch).start()
        poster.wait_acked(100)
        # A broker that dies loses what it acknowledged but had not passed on yet; that
        # is not the bridge's to prove. So let it pass everything on, stop it (SIGSTOP),
        # let the bridge stream into it, and kill it: what it held unread is lost, and
        # only the bridge, resending after the reconnect, can make up for it.
        with frozen(bridge):
            before.settle(quiet=0.5)
            broker.pause()
        poster.wait_acked(len(poster.acked) + 40)
        crash(broker)  # without persistence: its retained messages are gone too
        assert len(poster.acked) < len(batch), "the stream was over before the outage"
        wait_until(lambda: not before.client.is_connected(), "the watcher saw the outage", 10)
    finally:
        before.close()  # no reconnect: what it saw is everything before the outage
    poster.wait_acked(300)  # acknowledgements go on while the broker is down
    with frozen(bridge):
        broker.start()
        after = Watcher(broker.port, ["esim/#"])
    try:
        poster.join()
        assert poster.statuses() == {200: len(batch)}
        wait_for_events([before, after], ids(batch))
        after.settle()
        assert_delivered(before.messages + after.messages, early + poster.acked)
    finally:
        after.close()
    assert_retained_state(broker.port, early + poster.acked)


def test_discovery_is_republished_to_a_broker_that_lost_it(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess]
) -> None:
    """Home Assistant's configs are retained state too: a broker that restarts empty gets
    them again on the reconnect, with the eSIMs' state and availability."""
    broker.start()
    bridge = make_bridge(broker.url, homeassistant={"discovery": True}).start()
    batch = hooks("disc", iccids("09", 2), 2)
    for hook in batch:
        assert bridge.post(hook.body).status == 200
    configs = {"homeassistant/device/esim_bridge/config"} | {
        f"homeassistant/device/esim_{hook.iccid}/config" for hook in batch}

    def has_all() -> bool:
        return configs <= set(retained(broker.port, "homeassistant/#", wait=0.3))

    wait_until(has_all, "discovery before the restart", 20)
    before = retained(broker.port, "homeassistant/#", wait=0.3)
    crash(broker)  # without persistence: every retained message is gone
    broker.start()
    assert not retained(broker.port, "homeassistant/#", wait=0.3)
    wait_until(has_all, "discovery after the restart", 30)
    assert retained(broker.port, "homeassistant/#", wait=0.3) == before
    assert_retained_state(broker.port, batch)


# -- 3. kill -9 -------------------------------------------------------------------------------


def test_kill9_with_unpublished_backlog_loses_nothing_acknowledged(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess], place: Place
) -> None:
    """200 means kept: the bridge dies while webhooks are coming in and nothing has been
    published; every webhook that got its 200 before the kill is published after. On
    SQLite and on PostgreSQL (`place`)."""
    broker.start()
    bridge = make_bridge(broker.url, place).start()
    broker.stop()  # nothing drains
    batch = hooks("crash", iccids("04", 6), 400)
    poster = Poster(bridge, batch, stop_on_error=True).start()
    poster.wait_acked(150)
    bridge.kill()  # SIGKILL while requests are in flight
    poster.join()
    acked = list(poster.acked)
    assert len(acked) < len(batch), "the stream was over before the kill"

    broker.start()
    with Watcher(broker.port, ["esim/#"]) as watcher:
        bridge.start()
        wait_for_events([watcher], ids(acked))
        watcher.settle()
        assert_delivered(list(watcher.messages), acked, poster.unanswered())
    assert_retained_state(broker.port, acked, poster.unanswered())


def test_a_killed_publisher_is_started_again_and_loses_nothing(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess]
) -> None:
    """The publisher process dies (a bug, the OOM killer) while webhooks keep coming: the
    bridge says so on /readyz, starts it again, and everything acknowledged is published."""
    broker.start()
    bridge = make_bridge(broker.url).start()
    assert bridge.proc is not None
    children = [pid for pid in family(bridge.proc.pid) if pid != bridge.proc.pid]
    assert len(children) == 1, f"expected one publisher process, found {children}"
    batch = hooks("respawn", iccids("13", 4), 200)
    with Watcher(broker.port, ["esim/#"]) as watcher:
        poster = Poster(bridge, batch).start()
        poster.wait_acked(50)
        os.kill(children[0], signal.SIGKILL)
        poster.join()
        assert poster.statuses() == {200: len(batch)}, "the webhook side must not notice"
        wait_for_events([watcher], ids(batch))
        watcher.settle()
        assert_delivered(list(watcher.messages), batch)
    wait_until(lambda: bridge.get("/readyz").status == 200, "ready again", timeout=15)
    again = [pid for pid in family(bridge.proc.pid) if pid != bridge.proc.pid]
    assert len(again) == 1 and again != children, again


def test_no_200_before_the_commit_and_a_locked_store_answers_503(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess]
) -> None:
    """The test holds the store's write lock: a bridge that answered before its commit
    would say 200 now (and lose the webhooks); this one can only wait, then say 503."""
    broker.start()
    bridge = make_bridge(broker.url).start()
    first = hooks("lock", iccids("11", 1), 1)
    assert bridge.post(first[0].body).status == 200
    batch = hooks("locked", iccids("11", 4), 4, start=10)
    lock = sqlite3.connect(bridge.workdir / "bridge.db", isolation_level=None, timeout=10)
    try:
        lock.execute("BEGIN IMMEDIATE")  # no other writer until we let go
        # 10s: about what a webhook sender waits before it gives up and retries
        poster = Poster(bridge, batch, timeout=10.0).start()
        time.sleep(1.0)
        assert 200 not in poster.statuses(), "acknowledged while the store could not commit"
        assert request(bridge.base_url + "/healthz", timeout=5).status == 200
        poster.join()
        assert poster.statuses() == {503: len(batch)}, poster.answers
        for hook in batch:
            _, body, _ = poster.answers[hook.notify_id]
            assert body["ok"] is False and "locked" in body["error"], body
        ready = bridge.get("/readyz")
        assert ready.status == 503 and any("locked" in r for r in ready.json()["reasons"])
    finally:
        if lock.in_transaction:
            lock.rollback()
        lock.close()
    with Watcher(broker.port, ["esim/#"]) as watcher:
        for hook in batch:  # nothing of them was kept: the retry is new, not a duplicate
            assert bridge.post(hook.body).json() == {"ok": True}
        wait_for_events([watcher], ids(batch))
        watcher.settle()
        assert_delivered(list(watcher.messages), batch)


def test_a_writer_holding_the_store_briefly_delays_webhooks_not_refuses_them(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess]
) -> None:
    """Another writer (the publisher deleting sent rows, the cleanup) holds the lock for
    a moment now and then: the webhooks that arrive meanwhile wait for it, and get 200."""
    broker.start()
    bridge = make_bridge(broker.url).start()
    batch = hooks("brief", iccids("12", 4), 8)
    lock = sqlite3.connect(bridge.workdir / "bridge.db", isolation_level=None, timeout=10)
    sockets: list[socket.socket] = []
    try:
        lock.execute("BEGIN IMMEDIATE")
        for hook in batch:  # each whole request sent, on a connection of its own
            sock = socket.create_connection(("127.0.0.1", bridge.port), timeout=10)
            sockets.append(sock)
            sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(hook.body), hook.body))
        # well inside the bridge's patience for another writer (0.25 s): every one waits
        answered, _, _ = select.select(sockets, [], [], 0.1)
        assert answered == [], "answered while another writer held the store"
        lock.rollback()
        statuses = [read_status(sock) for sock in sockets]
    finally:
        lock.close()
        for sock in sockets:
            sock.close()
    assert statuses == [200] * len(batch)


def test_kill9_while_draining_is_at_least_once(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess]
) -> None:
    broker.start()
    bridge = make_bridge(broker.url).start()
    broker.stop()
    batch = hooks("drain", iccids("05", 6), 400)
    poster = Poster(bridge, batch).start()
    poster.join()
    assert poster.statuses() == {200: len(batch)}

    with frozen(bridge):
        broker.start()
        watcher = Watcher(broker.port, ["esim/#"])
    try:
        watcher.wait_count(EVENTS, 1)
        bridge.kill()  # in the middle of draining
        left = outbox_rows(bridge.workdir / "bridge.db")
        assert left > 0, "the outbox drained before the kill: nothing was tested"
        bridge.start()
        wait_for_events([watcher], ids(batch))
        watcher.settle()
        assert_delivered(list(watcher.messages), poster.acked)
    finally:
        watcher.close()
    assert_retained_state(broker.port, poster.acked)


# -- 4. the store's disk is full --------------------------------------------------------------


def _run(*argv: str) -> str | None:
    """Run a command; None when it worked, else why not."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{argv[0]}: {exc}"
    if done.returncode != 0:
        return f"{' '.join(argv)}: {done.stderr.decode(errors='replace').strip()}"
    return None


@contextlib.contextmanager
def small_filesystem(where: Path, size_kb: int) -> Iterator[Path]:
    """A file system of `size_kb` at `where`: tmpfs, or else a loop-mounted ext4 image.

    Skips when neither can be mounted (not root, no mount), but fails under CI=true,
    where the test must run."""
    where.mkdir(parents=True)
    problems: list[str] = []
    problem = _run("mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs",
                   str(where))
    if problem is not None:
        problems.append(problem)
        image = where.parent / f"{where.name}.img"
        with open(image, "wb") as f:
            f.truncate(size_kb * 1024)
        problem = _run("mkfs.ext4", "-q", "-F", str(image)) or _run(
            "mount", "-o", "loop", str(image), str(where)
        )
        if problem is not None:
            problems.append(problem)
            reason = "cannot mount a small file system: " + "; ".join(problems)
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
    try:
        yield where
    finally:
        if _run("umount", str(where)) is not None:
            _run("umount", "-l", str(where))


def fill(path: Path) -> None:
    """Write `path` until the file system has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 4096, 512, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


def test_full_disk_answers_503_writes_nothing_and_recovers(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess], tmp_path: Path
) -> None:
    broker.start()
    esims = iccids("06", 3)
    with small_filesystem(tmp_path / "small", 4096) as small:
        bridge = make_bridge(broker.url, db=small / "bridge.db").start()
        watcher = Watcher(broker.port, ["esim/#"])
        try:
            kept = hooks("kept", esims, 30)
            for hook in kept[:10]:
                assert bridge.post(hook.body).status == 200
            wait_for_events([watcher], ids(kept[:10]))
            broker.pause()  # the rest waits in the outbox when the disk fills up
            for hook in kept[10:]:
                assert bridge.post(hook.body).status == 200

            fill(small / "filler")
            refused: list[Hook] = []
            for hook in hooks("full", esims, 1000, start=1000):  # newer: would win the state
                answer = bridge.post(hook.body)
                if answer.status == 200:
                    kept.append(hook)  # still fitted (SQLite reuses free pages): kept, fine
                    continue
                assert answer.status == 503, answer
                assert answer.json()["ok"] is False and "store" in answer.json()["error"]
                refused.append(hook)
                if len(refused) >= 20:
                    break
            assert len(refused) >= 20, "the store never ran out of space"
            ready = bridge.get("/readyz")
            assert ready.status == 503 and any("full" in r for r in ready.json()["reasons"])
            broker.resume()  # the broker takes the backlog; the store cannot delete it yet

            wait_for_events([watcher], ids(kept))
            watcher.settle()
            assert_delivered(list(watcher.messages), kept)  # nothing of the refused ones
            assert_retained_state(broker.port, kept)  # nor in the state
            # the broker took the backlog but the store cannot delete it: that is retried
            # now and then, not in a loop that burns a CPU and floods the log
            failures = bridge.log().count("disk is full")
            assert failures < 200, f"{failures} store failures logged in a few seconds"

            (small / "filler").unlink()  # space is back
            for hook in refused:  # the sender retries: stored now, not a "duplicate"
                answer = bridge.post(hook.body)
                assert (answer.status, answer.json()) == (200, {"ok": True}), answer
            later = hooks("later", esims, 30, start=5000)
            for hook in later:
                assert bridge.post(hook.body).json() == {"ok": True}
            wait_for_events([watcher], ids(refused + later))
            bridge.wait_ready()
            watcher.settle()
            assert_delivered(list(watcher.messages), kept + refused + later)
            assert_retained_state(broker.port, later)
        finally:
            watcher.close()
            bridge.stop()  # before the file system goes away


# -- 5. SIGTERM under load --------------------------------------------------------------------


def test_sigterm_under_load_drains_says_offline_and_exits_0(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess]
) -> None:
    broker.start()
    grace = 10.0
    bridge = make_bridge(broker.url, mqtt={"shutdown_timeout": grace}).start()
    batch = hooks("term", iccids("07", 6), 3000)
    with Watcher(broker.port, ["esim/#"]) as watcher:
        broker.pause()  # a backlog builds up: more than the publisher has in flight
        try:
            poster = Poster(bridge, batch, stop_on_error=True).start()
            poster.wait_acked(300)
            assert bridge.proc is not None
            started = time.monotonic()
            bridge.proc.send_signal(signal.SIGTERM)  # while webhooks still come in
            time.sleep(1.0)  # the bridge is stopping; then the broker comes back
        finally:
            broker.resume()
        code = bridge.proc.wait(60)
        bridge.proc = None
        took = time.monotonic() - started
        poster.join()
        assert code == 0, bridge.log()[-3000:]
        # bounded: uvicorn's grace for open requests, then at most mqtt.shutdown_timeout
        assert took < grace + 15, f"the bridge took {took:.1f}s to stop"
        statuses = poster.statuses()
        assert statuses.get(0), f"requests were still taken after SIGTERM: {statuses}"
        assert set(statuses) <= {0, 200}, statuses
        acked, unanswered = list(poster.acked), poster.unanswered()

        # the broker was back within mqtt.shutdown_timeout: the drain sent everything
        watcher.wait_for("esim/bridge/state", b"offline")
        watcher.settle()
        assert_delivered(list(watcher.messages), acked, unanswered)
        assert watcher.payloads("esim/bridge/state")[-1] == b"offline"
    assert retained(broker.port, "esim/bridge/state") == {"esim/bridge/state": b"offline"}
    assert_retained_state(broker.port, acked, unanswered, online=False)
    assert outbox_rows(bridge.workdir / "bridge.db") == 0


def test_sigterm_with_a_stalled_broker_exits_in_time_and_keeps_the_rest(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess]
) -> None:
    broker.start()
    bridge = make_bridge(broker.url, mqtt={"shutdown_timeout": 1.0}).start()
    batch = hooks("stuck", iccids("08", 6), 300)
    with Watcher(broker.port, ["esim/#"]) as watcher:
        broker.pause()
        try:
            poster = Poster(bridge, batch).start()
            poster.join()
            assert poster.statuses() == {200: len(batch)}
            started = time.monotonic()
            assert bridge.terminate(timeout=60) == 0, bridge.log()[-3000:]
            took = time.monotonic() - started
            # bounded by mqtt.shutdown_timeout plus a little (2s to try `offline`): a
            # container runtime sends SIGKILL 10s after SIGTERM
            assert took < 1.0 + 6, f"the bridge took {took:.1f}s to stop"
            left = outbox_rows(bridge.workdir / "bridge.db")
            assert left > 0, "the outbox drained into a stopped broker?"
        finally:
            broker.resume()
        # `offline` reaches the broker: published before the exit, or as the last will
        watcher.wait_for("esim/bridge/state", b"offline", timeout=30)
        bridge.start()  # what was not drained is still there
        wait_for_events([watcher], ids(batch))
        watcher.settle()
        assert_delivered(list(watcher.messages), poster.acked)
    assert_retained_state(broker.port, poster.acked)


# -- 6. a stalled broker and the outbox cap ---------------------------------------------------


def test_stalled_broker_keeps_acking_until_the_outbox_cap(
    broker: Mosquitto, make_bridge: Callable[..., BridgeProcess]
) -> None:
    broker.start()
    cap = 2000  # messages; a DATA_USAGE webhook makes 7
    bridge = make_bridge(broker.url, store={"max_outbox": cap}).start()
    esims = iccids("10", 8)
    batch = hooks("stall", esims, 200)
    with Watcher(broker.port, ["esim/#"]) as watcher:
        broker.pause()  # SIGSTOP: connected, but it takes nothing
        try:
            started = time.monotonic()
            poster = Poster(bridge, batch).start()
            poster.join(timeout=60)
            took = time.monotonic() - started
            assert poster.statuses() == {200: len(batch)}
            assert took < 30, f"200 webhooks took {took:.1f}s with the broker stalled"
            assert backlog(bridge) >= 7 * len(batch)  # the outbox grows meanwhile

            extra: list[Hook] = []
            refused: list[tuple[Hook, Any]] = []
            for hook in hooks("over", esims, cap, start=1000):
                answer = bridge.post(hook.body)
                if answer.status == 200:
                    extra.append(hook)
                    continue
                refused.append((hook, answer))
                if len(refused) >= 3:
                    break
            assert refused, "the outbox grew past store.max_outbox"
            assert backlog(bridge) <= cap + 7
            for _, answer in refused:
                assert answer.status == 503, answer
                assert answer.json()["ok"] is False
                assert "max_outbox" in answer.json()["error"]
                assert (header(answer, "Retry-After") or "").isdigit(), answer.headers
        finally:
            broker.resume()
        acked = poster.acked + extra
        wait_for_events([watcher], ids(acked))
        wait_until(lambda: backlog(bridge) == 0, "the outbox drained")
        watcher.settle()
        assert_delivered(list(watcher.messages), acked)  # and none of the refused ones

        retries = [hook for hook, _ in refused]  # the sender retries after Retry-After
        for hook in retries:
            assert bridge.post(hook.body).json() == {"ok": True}
        wait_for_events([watcher], ids(retries))
        watcher.settle()
        assert_delivered(list(watcher.messages), acked + retries)
    assert_retained_state(broker.port, acked + retries)
