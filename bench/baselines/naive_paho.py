"""The obvious bridge: a Litestar handler that publishes with paho, no store.

What someone writes in an afternoon, in two flavours:
- `--mode fire`: publish (QoS 1, retained) and answer at once; fast, but a 200
  promises nothing (a crash or a broker outage loses acknowledged webhooks);
- `--mode wait`: answer only after the broker's PUBACK; honest, and shows what
  a round trip to the broker costs per request.
The bridge stores durably before it answers, so it sits somewhere between
these; both rows tell how much that guarantee costs.
Run: `python -m bench.baselines.naive_paho --port N --mqtt-port M --mode fire`.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import uvicorn
from litestar import Litestar, Request, get, post
from litestar.exceptions import HTTPException
from paho.mqtt.enums import CallbackAPIVersion

from bench.baselines.webhook_model import Webhook


class PubackWaiter:
    """Turns paho's PUBACK callbacks (network thread) into asyncio futures.

    A PUBACK can arrive before `publish()` has returned its mid to us, so the
    callback parks unknown mids in `early`; the lock is never held while
    calling into paho, so it cannot deadlock with paho's own locks.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.early: set[int] = set()

    def on_publish(self, client: mqtt.Client, userdata: Any, mid: int, *rest: Any) -> None:
        with self.lock:
            future = self.pending.pop(mid, None)
            if future is None:
                self.early.add(mid)
                return
        self.loop.call_soon_threadsafe(_resolve, future)

    def wait(self, mid: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.loop.create_future()
        with self.lock:
            if mid in self.early:
                self.early.discard(mid)
                future.set_result(None)
            else:
                self.pending[mid] = future
        return future


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def create_app(mqtt_port: int, mode: str, topic_base: str) -> Litestar:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"naive-{mode}")
    connected = threading.Event()
    waiter: PubackWaiter | None = None

    def on_connect(*_: Any) -> None:
        connected.set()

    def on_disconnect(*_: Any) -> None:
        connected.clear()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect

    async def startup() -> None:
        nonlocal waiter
        waiter = PubackWaiter(asyncio.get_running_loop())
        client.on_publish = waiter.on_publish
        client.connect_async("127.0.0.1", mqtt_port)
        client.loop_start()

    async def shutdown() -> None:
        client.disconnect()
        client.loop_stop()

    @post("/webhook", status_code=200)
    async def webhook(request: Request[Any, Any, Any]) -> dict[str, bool]:
        body = await request.body()
        event = msgspec.json.decode(body, type=Webhook)
        info = client.publish(f"{topic_base}/{event.content.iccid}/event", body, qos=1, retain=True)
        if mode == "wait":
            assert waiter is not None
            await waiter.wait(info.mid)
        return {"ok": True}

    @get("/readyz")
    async def readyz() -> dict[str, bool]:
        if not connected.is_set():
            raise HTTPException(status_code=503, detail="broker not connected")
        return {"ok": True}

    return Litestar(
        [webhook, readyz], on_startup=[startup], on_shutdown=[shutdown], openapi_config=None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mqtt-port", type=int, required=True)
    parser.add_argument("--mode", choices=("fire", "wait"), required=True)
    parser.add_argument("--topic-base", default="bench/naive")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.mqtt_port, args.mode, args.topic_base),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
