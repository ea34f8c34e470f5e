"""The HTTP side: a Litestar app that takes webhooks and answers once they are stored.

`create_app(config)` builds the app; its lifespan owns the resources, in the
order data flows: the embedded broker (when no mqtt.url is set), the store,
the publisher. Shutting down runs that order backwards, so the publisher can
still drain the outbox and say `offline` before the store closes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, asgi, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException, InternalServerException
from litestar.openapi import OpenAPIConfig

from bridge import __version__, homeassistant, topics
from bridge.broker import EmbeddedBroker
from bridge.config import Config
from bridge.metrics import CONTENT_TYPE, Metrics
from bridge.models import Decoded
from bridge.publisher import BrokerAddress, PublisherProcess, Settings
from bridge.security import Gate
from bridge.store import Accepted, Discovery, Store, StoreUnavailable
from bridge.topics import Message, Record
from bridge.webhook import ErrorAnswer, WebhookRoute, error_answer, webhook_path_item

log = logging.getLogger("bridge.webhook")

JSON = "application/json"


@dataclass
class Services:
    """Everything the lifespan starts; routes reach it through the closure."""

    config: Config
    metrics: Metrics = field(default_factory=Metrics)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    broker: EmbeddedBroker | None = None
    store: Store | None = None
    publisher: PublisherProcess | None = None

    def info(self) -> dict[str, Any]:
        """The `bridge/info` payload."""
        store, publisher, metrics = self.store, self.publisher, self.metrics
        return {
            "version": __version__,
            "started_at": self.started_at.isoformat(),
            "counts": {
                "webhooks_received": metrics.received,
                "duplicates": metrics.duplicates,
                "invalid": metrics.invalid,
                "published": publisher.published if publisher else 0,
                "outbox_backlog": store.backlog if store else 0,
                "esims": store.esims if store else 0,
            },
        }


def discovery_for(config: Config) -> tuple[Discovery | None, list[Message]]:
    """The Home Assistant extension: per-entity discovery, and the bridge device's config."""
    ha = config.homeassistant
    if not ha.discovery:
        return None, []
    base = config.mqtt.base_topic

    def discover(entity: str, record: Record) -> list[Message]:
        kind, _, iccid = entity.partition(":")
        if kind != "esim" or topics.iccid_problem(iccid) is not None:
            return []  # (the second: an eSIM stored by an older version, see RESERVED)
        topic, payload = homeassistant.esim_discovery(
            iccid, record.fields, base=base, prefix=ha.prefix, version=__version__
        )
        return [Message(topic, payload, True)]

    def inputs(entity: str, record: Record) -> object:
        return homeassistant.esim_config_inputs(record.fields)

    topic, payload = homeassistant.bridge_discovery(
        base=base, prefix=ha.prefix, version=__version__
    )
    return Discovery(discover, inputs), [Message(topic, payload, True)]


def _render(answer: ErrorAnswer) -> Response[bytes]:
    return Response(answer.body, status_code=answer.status, media_type=JSON,
                    headers=answer.headers)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    return _render(error_answer(exc))


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    # the route's template, not the path: a token in the path must never reach the log
    route = request.scope.get("path_template", "?")
    log.exception("unexpected error on %s %s", request.method, route)
    return _render(error_answer(InternalServerException("internal error; see the bridge's log")))


class _OpenedStore:
    """The store the lifespan opens after the routes exist, as the webhook's Ingest."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def submit_async(
        self, decoded: Decoded, body: bytes, received_at: datetime
    ) -> Awaitable[Accepted]:
        if self.services.store is None:
            raise StoreUnavailable("the store is not open yet")
        return self.services.store.submit_async(decoded, body, received_at)


def create_app(config: Config) -> Litestar:
    """The app, with its routes and a lifespan that starts and stops every resource."""
    services = Services(config)
    metrics = services.metrics
    gate = Gate(config.http.allowed_ips, config.http.trusted_proxies, config.http.token)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await asyncio.to_thread(_start, services)
        # Everything built so far (Litestar's app, the modules: ~55,000 objects) lives as
        # long as the process; a full garbage collection would walk it all again (~15 ms,
        # straight into some webhook's acknowledgement). Frozen, only new objects are.
        gc.freeze()
        info = asyncio.create_task(_publish_info(services))
        try:
            yield
        finally:
            info.cancel()
            await asyncio.to_thread(_stop, services)

    route = WebhookRoute(config.http, gate, metrics, _OpenedStore(services))
    path = config.http.path.rstrip("/")
    handlers: list[Any] = [
        asgi(path, name="webhook", is_mount=route.mounted, copy_scope=False)(route)
    ]

    @get("/healthz", summary="200 while the process serves")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @get("/readyz", summary="200 when the store works and the broker is connected")
    async def readyz() -> Response[dict[str, Any]]:
        reasons = []
        store, publisher = services.store, services.publisher
        if store is None or not store.alive:
            reasons.append("the store is not running")
        elif store.last_error:
            reasons.append(store.last_error)
        if publisher is None or not publisher.connected:
            address = publisher.address if publisher else None
            where = f" at {address.host}:{address.port}" if address else ""
            error = publisher.last_error if publisher else "not started"
            reasons.append(f"not connected to the MQTT broker{where}: {error}")
        if reasons:
            return Response({"ready": False, "reasons": reasons}, status_code=503)
        return Response({"ready": True, "outbox_backlog": store.backlog if store else 0})

    @get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE)
    async def prometheus() -> Response[bytes]:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app = Litestar(
        route_handlers=[*handlers, healthz, readyz, prometheus],
        lifespan=[lifespan],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        openapi_config=OpenAPIConfig(title="esim-bridge", version=__version__, path="/schema"),
        request_max_body_size=config.http.max_body_bytes,
        logging_config=None,  # the CLI configures logging; Litestar would replace the format
        state=State({"services": services}),
    )
    # an ASGI route is not in the OpenAPI document by itself: describe it there
    app.openapi_schema.paths = {path: webhook_path_item(), **(app.openapi_schema.paths or {})}
    return app


def _start(services: Services) -> None:
    config = services.config
    url = config.mqtt.url
    if url is None:
        services.broker = EmbeddedBroker(config.mqtt.embedded_listen)
        services.broker.start()
        url = services.broker.url
        broker = services.broker
        if broker.host in ("0.0.0.0", "::"):
            where = f"this machine's address, port {broker.port}"
        else:
            where = f"{broker.host}:{broker.port}"
            if broker.host in ("127.0.0.1", "::1", "localhost"):
                where += (" (this machine only: for Home Assistant in a VM or a container, "
                          f"set mqtt.embedded_listen = \"0.0.0.0:{broker.port}\")")
        log.info(
            "no mqtt.url set: using the embedded broker. Point Home Assistant's MQTT "
            "integration (and Node-RED) at %s, or set mqtt.url to use a broker of your own.",
            where,
        )
    discovery, bridge_config = discovery_for(config)
    store = Store(
        Path(config.store.path),
        base=config.mqtt.base_topic,
        dedup_hours=config.store.dedup_hours,
        max_outbox=config.store.max_outbox,
        synchronous=config.store.synchronous,
        discovery=discovery,
    )
    store.open()
    services.store = store
    store.sync_discovery(bridge_config)
    publisher = PublisherProcess(
        Settings(
            db_path=str(store.path),
            synchronous=config.store.synchronous,
            address=BrokerAddress.parse(url),
            client_id=config.mqtt.client_id,
            base=config.mqtt.base_topic,
            qos=config.mqtt.qos,
            keepalive=config.mqtt.keepalive,
            birth_topic=f"{config.homeassistant.prefix}/status",
            log_level=config.log.level.upper(),
        )
    )
    services.publisher = publisher
    store.on_commit(publisher.poke)
    services.metrics.bind(
        backlog=lambda: store.backlog,
        published=lambda: publisher.published,
        connected=lambda: float(publisher.connected),
        esims=lambda: store.esims,
    )
    publisher.start()


INFO_EVERY = 5.0  # s between looks at the counts while the broker is connected
INFO_WAIT = 0.25  # s between looks at the connection while it is not


async def _publish_info(services: Services) -> None:
    """Put `bridge/info` in the outbox once the broker is connected, then whenever its
    counts change. Not while the broker is away: nobody would see it, and each one would
    add to the outbox backlog it reports, a change that called for another one. For the
    same reason `published` does not count bridge/info itself (see the publisher)."""
    last = b""
    while True:
        publisher, store = services.publisher, services.store
        if publisher is None or store is None or not publisher.connected:
            await asyncio.sleep(INFO_WAIT)
            continue
        payload = msgspec.json.encode(services.info())
        if payload != last:
            store.append_async([Message(f"{services.config.mqtt.base_topic}/bridge/info",
                                        payload, True)])
            last = payload
        await asyncio.sleep(INFO_EVERY)


def _stop(services: Services) -> None:
    if services.publisher is not None:
        services.publisher.stop(services.config.mqtt.shutdown_timeout)
    if services.store is not None:
        services.store.close()
    if services.broker is not None:
        services.broker.stop()
