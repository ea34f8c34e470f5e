"""Prometheus metrics, in a registry of the app's own (so tests can build many apps)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4"  # Litestar adds "; charset=utf-8" to a text type


class Metrics:
    """What the bridge counts. `webhooks` by notify type and outcome, which is one of
    accepted, duplicate, raw (accepted but not understood), rejected, unavailable."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.webhooks = Counter(
            "esim_bridge_webhooks", "Webhooks answered, by notify type and outcome",
            ["notify_type", "outcome"], registry=self.registry,
        )
        self.ack_seconds = Histogram(
            "esim_bridge_ack_seconds", "Time from request to durable acknowledgement",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.warnings = Counter(
            "esim_bridge_warnings", "Webhooks accepted with a warning (unknown shape, bad id)",
            registry=self.registry,
        )
        self.outbox = Gauge(
            "esim_bridge_outbox_backlog", "MQTT messages stored but not yet acknowledged by "
            "the broker", registry=self.registry,
        )
        self.published = Gauge(
            "esim_bridge_mqtt_published", "MQTT messages the broker acknowledged since start",
            registry=self.registry,
        )
        self.connected = Gauge(
            "esim_bridge_mqtt_connected", "1 while connected to the broker",
            registry=self.registry,
        )
        self.provider_calls = Counter(
            "esim_bridge_provider_calls", "Requests sent to the provider's API (retries "
            "included), by endpoint and outcome: ok, unauthorized, unreachable, error",
            ["endpoint", "outcome"], registry=self.registry,
        )
        self.esims = Gauge(
            "esim_bridge_esims", "eSIMs known to the store", registry=self.registry
        )
        self.publishing = Gauge(
            "esim_bridge_publishing", "1 while this replica publishes and calls the provider "
            "(with several replicas on PostgreSQL, one at a time; else always 1)",
            registry=self.registry,
        )
        self.received = 0
        self.duplicates = 0
        self.invalid = 0

    def bind(
        self,
        backlog: Callable[[], float],
        published: Callable[[], float],
        connected: Callable[[], float],
        esims: Callable[[], float],
        publishing: Callable[[], float],
    ) -> None:
        """Read live values from the store and the publisher when scraped."""
        self.outbox.set_function(backlog)
        self.published.set_function(published)
        self.connected.set_function(connected)
        self.esims.set_function(esims)
        self.publishing.set_function(publishing)

    def count(self, notify_type: str, outcome: str) -> None:
        self.webhooks.labels(notify_type, outcome).inc()
        if outcome in ("accepted", "duplicate", "raw"):
            self.received += 1
        if outcome == "duplicate":
            self.duplicates += 1
        if outcome in ("rejected",):
            self.invalid += 1

    def provider_call(self, endpoint: str, outcome: str) -> None:
        """The ProviderClient's `on_call`."""
        self.provider_calls.labels(endpoint, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
