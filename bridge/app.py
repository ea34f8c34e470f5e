"""The HTTP side: a Litestar app that takes webhooks and answers once they are stored.

`create_app(config)` builds the resources (`Services`) and the app; a lifespan per
resource starts and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, asgi, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException, InternalServerException
from litestar.openapi import OpenAPIConfig

from bridge import __version__
from bridge.broker import EmbeddedBroker
from bridge.committer import Committer
from bridge.config import Config
from bridge.homeassistant import HomeAssistant, birth_topic
from bridge.maintenance import Maintenance
from bridge.metrics import CONTENT_TYPE, Metrics
from bridge.outbox import Message
from bridge.publisher import BrokerAddress, PublisherProcess, Settings
from bridge.security import Gate
from bridge.store import Batch, Store, StoreUnavailable
from bridge.topics import Topics
from bridge.webhook import ErrorAnswer, WebhookRoute, error_answer, webhook_path_item

log = logging.getLogger("bridge.webhook")

JSON = "application/json"


@dataclass
class Services:
    """The bridge's resources, built with the app and started by its lifespans, one each,
    in the order data flows: the embedded broker (when no mqtt.url is set), the store
    (with its committer and maintenance), the provider's sync (when configured), the
    publisher, `bridge/info`. Shutting down runs that order backwards, so the publisher
    can still drain the outbox and say `offline` before the store closes. A route holds
    what it needs from the start: the committer answers 503 until the store is open."""

    config: Config
    topics: Topics
    store: Store
    committer: Committer
    maintenance: Maintenance
    publisher: PublisherProcess
    broker: EmbeddedBroker | None
    metrics: Metrics = field(default_factory=Metrics)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    replica: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    info_posted: int = 0  # bridge/info messages put in the outbox (not counted as published)

    @classmethod
    def build(cls, config: Config) -> Services:
        topics = Topics(config.mqtt.base_topic)
        ha = config.homeassistant
        extension = HomeAssistant(
            topics, prefix=ha.prefix, version=__version__,
            provider=bool(config.provider.access_code),  # its entities, with the provider
            forget_ended_days=ha.forget_ended_days,
            replicas=config.store.url is not None,  # then which replica publishes, too
        ) if ha.discovery else None
        broker = EmbeddedBroker(config.mqtt.embedded_listen) if config.mqtt.url is None else None
        path = Path(config.store.path)
        url = config.store.url  # PostgreSQL, instead of the SQLite file at `path`
        store = Store(
            path,
            url=url,
            topics=topics,
            dedup_hours=config.store.dedup_hours,
            max_outbox=config.store.max_outbox,
            synchronous=config.store.synchronous,
            homeassistant=extension,
            keep_activation=config.provider.publish_activation,
        )
        client_id = config.mqtt.client_id
        if url is not None:  # several replicas may share the store: one id each
            client_id = f"{client_id}-{socket.gethostname()}-{os.getpid()}"
        publisher = PublisherProcess(
            Settings(
                db_path=str(path),
                synchronous=config.store.synchronous,
                store_url=url,
                address=BrokerAddress.parse(broker.url if broker else str(config.mqtt.url)),
                client_id=client_id,
                state_topic=topics.bridge_state,
                qos=config.mqtt.qos,
                keepalive=config.mqtt.keepalive,
                birth_topic=birth_topic(ha.prefix),
                commands=[topics.refresh_commands] if config.provider.access_code else [],
                log_level=config.log.level.upper(),
            )
        )
        maintenance = Maintenance(
            path, synchronous=config.store.synchronous, dedup_hours=config.store.dedup_hours,
            url=url,
        )
        return cls(config, topics, store, Committer(store), maintenance, publisher, broker)

    def counts(self) -> dict[str, int]:
        """The counts of `bridge/info`. `published` leaves out bridge/info itself: counted,
        every bridge/info would change the next one."""
        metrics = self.metrics
        return {
            "webhooks_received": metrics.received,
            "duplicates": metrics.duplicates,
            "invalid": metrics.invalid,
            "published": max(self.publisher.published - self.info_posted, 0),
            "outbox_backlog": self.store.backlog,
            "esims": self.store.esims,
        }

    @property
    def publishing(self) -> bool:
        """This replica publishes and calls the provider: always with SQLite (one bridge);
        with store.url, while its publisher holds the lease (bridge/lease.py)."""
        return self.config.store.url is None or self.publisher.publishing

    def readiness(self) -> list[str]:
        """Why the bridge is not ready; empty when it is. A replica that does not publish
        is ready when its store works: it takes webhooks for the one that does."""
        reasons = []
        if not (self.store.is_open and self.maintenance.alive):
            reasons.append("the store is not running")
        elif self.committer.last_error:
            reasons.append(self.committer.last_error)
        publisher = self.publisher
        if not self.publishing:
            if publisher.status.lease_error:
                reasons.append(publisher.status.lease_error)
        elif not publisher.connected:
            address = publisher.address
            reasons.append(f"not connected to the MQTT broker at {address.host}:"
                           f"{address.port}: {publisher.last_error}")
        return reasons


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


def create_app(config: Config) -> Litestar:
    """The app, with its routes and a lifespan per resource."""
    services = Services.build(config)
    metrics = services.metrics
    gate = Gate(config.http.allowed_ips, config.http.trusted_proxies, config.http.token)
    route = WebhookRoute(config.http, gate, metrics, services.committer)
    path = config.http.path.rstrip("/")
    handlers: list[Any] = [
        asgi(path, name="webhook", is_mount=route.mounted, copy_scope=False)(route)
    ]

    @get("/healthz", summary="200 while the process serves")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @get("/readyz", summary="200 when the store works and the broker is connected")
    async def readyz() -> Response[dict[str, Any]]:
        reasons = services.readiness()
        if reasons:
            return Response({"ready": False, "reasons": reasons}, status_code=503)
        return Response({"ready": True, "outbox_backlog": services.store.backlog})

    @get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE)
    async def prometheus() -> Response[bytes]:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app = Litestar(
        route_handlers=[*handlers, healthz, readyz, prometheus],
        lifespan=[
            partial(_embedded_broker, services),
            partial(_store, services),
            partial(_provider_sync, services),  # before the publisher: it hears commands
            partial(_publisher, services),
            partial(_bridge_info, services),
            partial(_forget_ended, services),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        openapi_config=OpenAPIConfig(title="esim-bridge", version=__version__, path="/schema"),
        request_max_body_size=config.http.max_body_bytes,
        logging_config=None,  # the CLI configures logging; Litestar would replace the format
        state=State({"services": services}),
    )
    # an ASGI route is not in the OpenAPI document by itself: describe it there
    app.openapi_schema.paths = {path: webhook_path_item(), **(app.openapi_schema.paths or {})}
    return app


@asynccontextmanager
async def _embedded_broker(services: Services, app: Litestar) -> AsyncIterator[None]:
    broker = services.broker
    if broker is None:
        yield
        return
    await asyncio.to_thread(broker.start)
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
    try:
        yield
    finally:
        await asyncio.to_thread(broker.stop)


@asynccontextmanager
async def _store(services: Services, app: Litestar) -> AsyncIterator[None]:
    """Open the store, start its upkeep, and bring the retained topics in line with the
    settings (discovery on or off, its prefix, the base topic) before taking webhooks."""
    store, maintenance, committer = services.store, services.maintenance, services.committer
    await asyncio.to_thread(store.open)
    maintenance.start()
    try:
        await committer.resync()
        yield
    finally:
        committer.close()
        maintenance.stop()
        await asyncio.to_thread(store.close)


@asynccontextmanager
async def _publisher(services: Services, app: Litestar) -> AsyncIterator[None]:
    publisher, store = services.publisher, services.store
    services.committer.on_commit(lambda batch: publisher.poke())
    services.metrics.bind(
        backlog=lambda: store.backlog,
        published=lambda: publisher.published,
        connected=lambda: float(publisher.connected),
        esims=lambda: store.esims,
        publishing=lambda: float(services.publishing),
    )
    await asyncio.to_thread(publisher.start)
    try:
        yield
    finally:
        await asyncio.to_thread(publisher.stop, services.config.mqtt.shutdown_timeout)


@asynccontextmanager
async def _provider_sync(services: Services, app: Litestar) -> AsyncIterator[None]:
    """The provider's API as a second source of state, when an access code is set;
    without one it is never called."""
    settings = services.config.provider
    if not settings.access_code:
        yield
        return
    # imported here: httpx is a few MB that a bridge without the provider never needs
    from bridge.provider import ProviderClient
    from bridge.sync import Sync

    async with ProviderClient(settings, on_call=services.metrics.provider_call) as client:
        sync = Sync(client, services.committer, services.store, services.topics, settings)

        def orders_ready(batch: Batch) -> None:
            for order_no in batch.orders_ready:
                sync.order_ready(order_no)

        services.committer.on_commit(orders_ready)
        loop = asyncio.get_running_loop()

        def command(topic: str, payload: bytes) -> None:  # on the publisher's status thread
            target = services.topics.refreshed(topic)
            if target is not None:
                loop.call_soon_threadsafe(sync.refresh, target)

        services.publisher.on_command(command)
        task = asyncio.create_task(_while_publishing(services, sync.run))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@asynccontextmanager
async def _bridge_info(services: Services, app: Litestar) -> AsyncIterator[None]:
    # Everything built so far (Litestar's app, the modules: ~55,000 objects) lives as
    # long as the process; a full garbage collection would walk it all again (~15 ms,
    # straight into some webhook's acknowledgement). Frozen, only new objects are.
    gc.freeze()
    task = asyncio.create_task(_publish_info(services))
    try:
        yield
    finally:
        task.cancel()


FORGET_EVERY = 3600.0  # s between looks for eSIMs Home Assistant should forget by now


@asynccontextmanager
async def _forget_ended(services: Services, app: Litestar) -> AsyncIterator[None]:
    """Days pass without events: look every hour for eSIMs that ended
    homeassistant.forget_ended_days ago (the resync at start looked already)."""

    async def forget() -> None:
        while True:
            await asyncio.sleep(FORGET_EVERY)
            with contextlib.suppress(StoreUnavailable):  # logged; the next hour tries again
                await services.committer.forget()

    task = asyncio.create_task(_while_publishing(services, forget))
    try:
        yield
    finally:
        task.cancel()


ROLE_EVERY = 0.5  # s between looks at whether this replica publishes


async def _while_publishing(
    services: Services, work: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Run `work()` while this replica publishes: of several replicas, the publishing one
    alone calls the provider and forgets ended eSIMs. Cancelled when it steps down, and
    started afresh when it publishes again (with SQLite, it always does)."""
    while True:
        while not services.publishing:
            await asyncio.sleep(ROLE_EVERY)
        task = asyncio.create_task(work())
        try:
            while services.publishing and not task.done():
                await asyncio.sleep(ROLE_EVERY)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # a failure of its own is raised here, as it was before


INFO_EVERY = 5.0  # s between looks at the counts while the broker is connected
INFO_WAIT = 0.25  # s between looks at the connection while it is not


async def _publish_info(services: Services) -> None:
    """Put `bridge/info` in the outbox once the broker is connected, then whenever its
    counts change. Not while the broker is away: nobody would see it, and each one would
    add to the outbox backlog it reports, a change that called for another one. A store
    that cannot write now leaves it for the next look."""
    last: dict[str, int] = {}
    topic = services.topics.bridge_info
    while True:
        if not services.publisher.connected:
            await asyncio.sleep(INFO_WAIT)
            continue
        counts = services.counts()
        if counts != last:
            payload = msgspec.json.encode({
                "version": __version__,
                "started_at": services.started_at.isoformat(),
                "publisher": services.replica,  # this one: only the publishing replica says
                "counts": counts,
            })
            try:
                await services.committer.post([Message(topic, payload, True)])
            except StoreUnavailable:
                pass  # the committer logged it, and /readyz says so
            else:
                services.info_posted += 1
                last = counts
        await asyncio.sleep(INFO_EVERY)
