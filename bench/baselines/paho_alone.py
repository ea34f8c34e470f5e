"""One paho client alone, publishing QoS 1 retained messages as fast as it can.

Not a webhook system: the rate of MQTT messages one Python paho client gets
acknowledged by this Mosquitto on this machine. The bridge publishes several
messages per webhook through paho, so this bounds its end-to-end rate.
Prints one JSON object: {"acked": n, "duration": s, "rate": n/s}.
Run: `python -m bench.baselines.paho_alone --mqtt-port M --duration 10`.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.webhook import BodyFactory, iccid

INFLIGHT = 100
QUEUED = 1000


class Counter:
    """PUBACKs seen, and a gate that keeps at most QUEUED messages unacknowledged."""

    def __init__(self) -> None:
        self.acked = 0
        self.cond = threading.Condition()

    def on_publish(self, *_: Any) -> None:
        with self.cond:
            self.acked += 1
            self.cond.notify()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mqtt-port", type=int, required=True)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--topic-base", default="bench/paho")
    args = parser.parse_args()

    counter = Counter()
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="paho-alone")
    client.max_inflight_messages_set(INFLIGHT)
    client.on_publish = counter.on_publish
    client.on_connect = lambda *_: connected.set()
    client.connect("127.0.0.1", args.mqtt_port)
    client.loop_start()
    try:
        if not connected.wait(10):
            print("paho-alone: no CONNACK within 10 s", file=sys.stderr)
            return 1
        bodies = BodyFactory(tag=0xFFFFFFFF, iccids=100)
        topics = [f"{args.topic_base}/{iccid(i)}/state" for i in range(100)]
        sent = 0
        start = time.monotonic()
        end = start + args.duration
        while time.monotonic() < end:
            with counter.cond:
                while sent - counter.acked >= QUEUED:
                    counter.cond.wait(0.1)
            client.publish(topics[sent % 100], bodies.body(sent), qos=1, retain=True)
            sent += 1
        with counter.cond:
            acked = counter.acked
        elapsed = time.monotonic() - start
    finally:
        client.disconnect()
        client.loop_stop()
    result = {"acked": acked, "duration": elapsed, "rate": acked / elapsed}
    print(msgspec.json.encode(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
