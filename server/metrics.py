"""Prometheus metrics, on a registry of the app's own (several apps can share a process)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from plumbing.metrics import WORKER_COUNTERS

LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
)

_WORKER_HELP = dict(WORKER_COUNTERS)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        #: Settled bets and their server-side time (stakepro_bets_total, stakepro_bet_seconds).
        self.bet_stats = BetStats(LATENCY_BUCKETS)
        self.registry.register(self.bet_stats)
        #: The workers' counters, as the last scrape read them from Redis.
        self.worker_stats = WorkerStats()
        self.registry.register(self.worker_stats)
        self.errors = Counter(
            "stakepro_errors_total", "Error replies by protocol code", ["code"],
            registry=self.registry,
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
        self.outbox_longest = Gauge(
            "stakepro_outbox_longest_entries",
            "Entries in the longest outbox stream (events not yet persisted)",
            registry=self.registry,
        )
        self.outbox_full = Gauge(
            "stakepro_outbox_full_buckets",
            "Buckets whose outbox is at OUTBOX_MAX_LEN: their bets and deposits are refused",
            registry=self.registry,
        )
        self.feed_batches = Counter(
            "stakepro_feed_batches_total", "Feed batches published to Redis / broadcast locally",
            ["stage"], registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BetStats(Collector):
    """The per-bet counters, kept as plain numbers and exported at scrape time.

    prometheus_client's Counter and Histogram take a lock per update, a measurable share of
    the bet path's CPU at thousands of bets a second (docs/benchmarks.md, "Figures behind
    choices in the code"). The event loop is the only writer, so plain integers suffice; a
    scrape reads them on the same thread.
    """

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._bounds = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._settled: dict[tuple[str, bool], int] = {}

    def observe(self, seconds: float) -> None:
        """One bet answered after ``seconds`` (frame in to reply out)."""
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def settled(self, currency: str, win: bool) -> None:
        key = (currency, win)
        self._settled[key] = self._settled.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        bets = CounterMetricFamily(
            "stakepro_bets", "Settled bets", labels=["currency", "outcome"]
        )
        for (currency, win), count in sorted(self._settled.items()):
            bets.add_metric([currency, "win" if win else "loss"], count)
        yield bets
        cumulative, buckets = 0, []
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        latency = HistogramMetricFamily(
            "stakepro_bet_seconds", "Server-side bet time, frame in to reply out"
        )
        latency.add_metric([], buckets, self._sum)
        yield latency


class WorkerStats(Collector):
    """Counters the workers keep in Redis (``Keys.worker_stats()``: the commission flush's
    statements and paid units), exported as ``stakepro_<field>_total``. The /metrics handler
    reads the hash before each render; the workers serve no /metrics of their own."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def update(self, raw: Mapping[bytes | str, bytes | str]) -> None:
        values: dict[str, int] = {}
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else key
            if name in _WORKER_HELP:
                try:
                    values[name] = int(value)
                except ValueError:
                    continue
        self.values = values

    def collect(self) -> Iterator[Metric]:
        for name, help_text in WORKER_COUNTERS:
            if name in self.values:
                yield CounterMetricFamily(f"stakepro_{name}", help_text, value=self.values[name])
