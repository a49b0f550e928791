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

    def render(self) -> bytes:
        return generate_latest(self.registry)
