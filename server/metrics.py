"""Prometheus metrics, on a registry of the app's own (several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.bets = Counter(
            "stakepro_bets_total", "Settled bets", ["currency", "outcome"],
            registry=self.registry,
        )
        self.errors = Counter(
            "stakepro_errors_total", "Error replies by protocol code", ["code"],
            registry=self.registry,
        )
        self.bet_latency = Histogram(
            "stakepro_bet_seconds", "Server-side bet time, frame in to reply out",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.sockets = Gauge(
            "stakepro_open_sockets", "Open WebSockets", ["kind"], registry=self.registry
        )
        self.feed_dropped_bets = Counter(
            "stakepro_feed_dropped_bets_total",
            "Feed entries dropped (outbox_full, publish_failed, inbox_full)", ["reason"],
            registry=self.registry,
        )
        self.feed_dropped_spectators = Counter(
            "stakepro_feed_dropped_spectators_total",
            "Feed sockets closed by the server (too_slow, chatty)", ["reason"],
            registry=self.registry,
        )
        self.feed_batches = Counter(
            "stakepro_feed_batches_total", "Feed batches published to Redis / broadcast locally",
            ["stage"], registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
