"""The embedded MQTT broker (amqtt): the zero-setup default when no mqtt.url is set.

It runs in a child process of its own, so a busy broker can never stall the
webhook path, and it dies with the bridge. For production, point mqtt.url at
a real broker (Mosquitto); this one keeps retained messages in memory only,
which the bridge covers by republishing its state on every connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not start; the message says what to set instead."""


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _port_in_use(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """Starts `python -m bridge.broker HOST:PORT` and stops it again."""

    def __init__(self, listen: str) -> None:
        self.host, self.port = split_listen(listen)
        self.listen = listen
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Where the bridge's own publisher connects: loopback when it listens on all."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"mqtt://{host}:{self.port}" if ":" not in host else f"mqtt://[{host}]:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        if _port_in_use(self.host, self.port):
            raise BrokerError(
                f"cannot start the embedded MQTT broker: {self.listen} is already in use. "
                f"If that is a broker you want to use, set mqtt.url = "
                f"\"mqtt://{self.host}:{self.port}\" (or ESIM_BRIDGE_MQTT_URL); otherwise set "
                "mqtt.embedded_listen (ESIM_BRIDGE_MQTT_EMBEDDED_LISTEN) to a free host:port."
            )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.broker", self.listen],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,  # it says `ready` there once it listens
            start_new_session=True,  # Ctrl-C reaches the bridge, which stops the broker itself
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        self.proc.stdout.close()
        if line.strip() == b"ready":
            log.info("embedded MQTT broker listening on %s", self.listen)
            return
        try:  # end of output without `ready`: it is exiting; get its code
            code: int | None = self.proc.wait(2)
        except subprocess.TimeoutExpired:
            code = None
        self.stop()
        if code is not None:
            raise BrokerError(
                f"the embedded MQTT broker exited at start (code {code}); is {self.listen} "
                "free? Set mqtt.embedded_listen, or mqtt.url for a broker of your own."
            )
        raise BrokerError(f"the embedded MQTT broker did not listen on {self.listen} in time")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def _config(listen: str) -> dict[str, object]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": listen, "max_connections": 100}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def _serve(listen: str) -> None:
    from amqtt.broker import Broker

    broker = Broker(_config(listen))
    await broker.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    parent = os.getppid()
    while not stop.is_set():
        if os.getppid() != parent:  # the bridge died (even kill -9): do not linger
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
    await broker.shutdown()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s embedded-broker %(message)s")
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    listen = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:1883"
    asyncio.run(_serve(listen))


if __name__ == "__main__":
    main()
