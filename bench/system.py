"""The systems under test: how to start one, know it is ready, and stop it.

Every system is its own process group, started fresh for every round (so the
bridge's startup-to-ready time is measured each round, and no round inherits
another's database) and always stopped, group and all, even on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.baselines import node_red
from tests.brokers import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Launch:
    """One start of a system: its argv, and where it answers HTTP (None: no HTTP).

    `replicas`: more processes of the same system, started beside this one, that take
    webhooks too (the load goes to each in turn); `cleanup` runs once every one of them
    has stopped, for what the launch made outside the workdir (a database).
    """

    argv: list[str]
    http_port: int | None
    env: dict[str, str] = field(default_factory=dict)
    replicas: tuple[Launch, ...] = ()
    cleanup: Callable[[], None] | None = None

    @property
    def everyone(self) -> list[Launch]:
        return [self, *self.replicas]


@dataclass(frozen=True)
class SystemSpec:
    """A row of the table.

    `topic_filter` is where its per-webhook event appears (None: publishes
    nothing to correlate); `launch(workdir, mqtt_port)` makes a Launch;
    `unavailable(quick)` says why it cannot run here, or None; `first_seen`: it does
    work on an eSIM's first webhook (a discovery config), timed as a phase of its own.
    """

    key: str
    label: str
    launch: Callable[[Path, int], Launch]
    topic_filter: str | None
    webhook: bool = True
    unavailable: Callable[[bool], str | None] = lambda quick: None
    first_seen: bool = False


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _bare(workdir: Path, mqtt_port: int) -> Launch:
    port = free_port()
    return Launch(_python("bench.baselines.bare_litestar", "--port", str(port)), port)


def _naive(mode: str) -> Callable[[Path, int], Launch]:
    def launch(workdir: Path, mqtt_port: int) -> Launch:
        port = free_port()
        argv = _python(
            "bench.baselines.naive_paho",
            *("--port", str(port), "--mqtt-port", str(mqtt_port)),
            *("--mode", mode, "--topic-base", f"bench/naive-{mode}"),
        )
        return Launch(argv, port)

    return launch


def _node_red(workdir: Path, mqtt_port: int) -> Launch:
    port = free_port()
    return Launch(node_red.command(workdir / "node-red", port, mqtt_port), port)


def _node_red_unavailable(quick: bool) -> str | None:
    if quick:
        return "not run in --quick (it needs an npm install and a warm-up)"
    return node_red.unavailable()


# The bridge as its users run it: what is not set here is the default (Home Assistant
# discovery on, the sender allow-list, which takes loopback, among others).
BRIDGE_CONFIG = """[http]
host = "127.0.0.1"
port = {port}

[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"

[store]
{store}
"""
# The machine's PostgreSQL, as the tests use it (user postgres, trust auth)
POSTGRES = "postgresql://postgres@127.0.0.1:5432"


def bridge_command() -> list[str]:
    script = Path(sys.executable).parent / "esim-bridge"
    return [str(script)] if script.exists() else _python("bridge")


def bridge_launch(workdir: Path, mqtt_port: int, synchronous: str = "full") -> Launch:
    store = f'path = "{workdir / "bridge.db"}"\nsynchronous = "{synchronous}"'
    return _bridge(workdir, mqtt_port, store)


def _bridge(workdir: Path, mqtt_port: int, store: str) -> Launch:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "bridge.toml"
    config.write_text(BRIDGE_CONFIG.format(port=port, mqtt_port=mqtt_port, store=store))
    return Launch([*bridge_command(), "serve", "--config", str(config)], port)


def _bridge_without_fsync(workdir: Path, mqtt_port: int) -> Launch:
    """The bridge with `store.synchronous = "normal"`: an acknowledgement no longer waits
    for the disk's fsync (it still survives a crash of the bridge, not a power cut). Not
    the default; the row shows what the fsync costs on this machine's disk."""
    return bridge_launch(workdir, mqtt_port, "normal")


def _bridge_unavailable(quick: bool) -> str | None:
    if not (ROOT / "bridge" / "cli.py").exists():
        return "bridge/cli.py does not exist yet (the CLI is being written)"
    return None


def _on_postgres(replicas: int) -> Callable[[Path, int], Launch]:
    """`replicas` bridges on one new database of the machine's PostgreSQL (`store.url`;
    dropped when the round ends) and on the one broker, configured alike, as a user would
    (with store.url each takes an MQTT client id of its own)."""

    def launch(workdir: Path, mqtt_port: int) -> Launch:
        with contextlib.ExitStack() as database:
            url = database.enter_context(_database())
            bridges = [
                _bridge(workdir / f"replica-{n}", mqtt_port, f'url = "{url}"')
                for n in range(1, replicas + 1)
            ]
            drop = database.pop_all().close  # kept until the round ends
        return dataclasses.replace(bridges[0], replicas=tuple(bridges[1:]), cleanup=drop)

    return launch


@contextlib.contextmanager
def _database() -> Iterator[str]:
    """A new database on the machine's PostgreSQL, dropped afterwards: its URL."""
    import psycopg

    name = f"esim_bench_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
    except psycopg.Error as exc:
        raise RuntimeError(f"cannot create a database at {POSTGRES}: {exc}") from exc
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        try:
            with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except psycopg.Error as exc:
            print(f"could not drop the database {name} ({exc}): drop it by hand",
                  file=sys.stderr, flush=True)


def _postgres_unavailable(quick: bool) -> str | None:
    if quick:
        return "full mode only, to keep --quick short"
    if reason := _bridge_unavailable(quick):
        return reason
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed: pip install -e '.[postgres]'"
    try:
        psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"no PostgreSQL for user postgres at 127.0.0.1:5432 ({exc})"
    return None


def paho_launch(duration: float) -> Callable[[Path, int], Launch]:
    def launch(workdir: Path, mqtt_port: int) -> Launch:
        argv = _python(
            "bench.baselines.paho_alone",
            *("--mqtt-port", str(mqtt_port), "--duration", str(duration)),
        )
        return Launch(argv, None)

    return launch


def all_systems(publish_seconds: float) -> list[SystemSpec]:
    """Every row, baselines first; the order is also the order within a round."""
    return [
        SystemSpec("bare", "bare Litestar (no MQTT)", _bare, None),
        SystemSpec("fire", "Litestar+paho, answer at once", _naive("fire"), "bench/naive-fire/#"),
        SystemSpec("wait", "Litestar+paho, answer on PUBACK", _naive("wait"), "bench/naive-wait/#"),
        SystemSpec(
            "paho",
            "paho alone (MQTT msgs/s)",
            paho_launch(publish_seconds),
            None,
            webhook=False,
        ),
        SystemSpec(
            "node-red",
            "Node-RED 4 flow",
            _node_red,
            f"{node_red.TOPIC_BASE}/#",
            unavailable=_node_red_unavailable,
        ),
        SystemSpec(
            "bridge",
            "esim-bridge",
            bridge_launch,
            "esim/event/#",
            unavailable=_bridge_unavailable,
            first_seen=True,
        ),
        SystemSpec(
            "bridge-normal",
            'esim-bridge, synchronous = "normal"',
            _bridge_without_fsync,
            "esim/event/#",
            unavailable=_bridge_unavailable,
            first_seen=True,
        ),
        SystemSpec(
            "bridge-pg",
            "esim-bridge on PostgreSQL",
            _on_postgres(1),
            "esim/event/#",
            unavailable=_postgres_unavailable,
            first_seen=True,
        ),
        SystemSpec(
            "bridge-pg2",
            "esim-bridge on PostgreSQL, 2 replicas (webhooks alternate)",
            _on_postgres(2),
            "esim/event/#",
            unavailable=_postgres_unavailable,
            first_seen=True,
        ),
    ]


class Process:
    """A started system: its own process group, its log file, a clean stop."""

    def __init__(self, launch: Launch, log: Path) -> None:
        self.launch = launch
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **launch.env}
        with log.open("ab") as sink:
            self.popen = subprocess.Popen(
                launch.argv,
                cwd=ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, timeout: float) -> float:
        """Polls GET /readyz until 200; returns seconds from start to ready."""
        assert self.launch.http_port is not None
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"exited with {self.popen.returncode} before ready")
            if _get_status(self.launch.http_port, "/readyz") == 200:
                return time.monotonic() - self.started
            time.sleep(0.02)
        raise TimeoutError(f"GET /readyz not 200 after {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the group (a clean shutdown), SIGKILL if it will not go."""
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)
        except ProcessLookupError:
            pass
        # whatever the leader left behind in its group (a worker, a node child)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _get_status(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()
