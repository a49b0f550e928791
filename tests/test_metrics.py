"""BetStats exports exactly what prometheus_client's own Counter and Histogram would."""

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from server.metrics import LATENCY_BUCKETS, Metrics


def _lines(text: bytes, prefix: str) -> list[str]:
    return sorted(line for line in text.decode().splitlines()
                  if line.startswith(prefix) and "_created" not in line)


@given(
    st.lists(st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(0, 3)), max_size=50),
    st.lists(st.tuples(st.sampled_from(["USDT", "BTC"]), st.booleans()), max_size=20),
)
def test_bet_stats_render_like_prometheus_client(
    latencies: list[float], settled: list[tuple[str, bool]]
) -> None:
    ours = Metrics()
    reference = CollectorRegistry()
    histogram = Histogram("stakepro_bet_seconds", "h", buckets=LATENCY_BUCKETS,
                          registry=reference)
    counter = Counter("stakepro_bets", "c", ["currency", "outcome"], registry=reference)
    for seconds in latencies:
        ours.bet_stats.observe(seconds)
        histogram.observe(seconds)
    for currency, win in settled:
        ours.bet_stats.settled(currency, win)
        counter.labels(currency, "win" if win else "loss").inc()
    mine, theirs = ours.render(), generate_latest(reference)
    assert _lines(mine, "stakepro_bet_seconds_bucket") == _lines(
        theirs, "stakepro_bet_seconds_bucket")
    assert _lines(mine, "stakepro_bet_seconds_count") == _lines(
        theirs, "stakepro_bet_seconds_count")
    assert _lines(mine, "stakepro_bets_total") == _lines(theirs, "stakepro_bets_total")
    [sum_mine] = _lines(mine, "stakepro_bet_seconds_sum")
    [sum_theirs] = _lines(theirs, "stakepro_bet_seconds_sum")
    assert abs(float(sum_mine.split()[1]) - float(sum_theirs.split()[1])) < 1e-9


def test_worker_stats_export_what_redis_holds() -> None:
    """The workers' counters as /metrics renders them: known fields only, integers only."""
    ours = Metrics()
    assert b"stakepro_commission" not in ours.render()  # nothing read yet: nothing shown
    ours.worker_stats.update({b"commission_flush_statements": b"3",
                              b"commission_units_paid": b"12", b"other": b"5",
                              "commission_units_paid_bad": "x"})
    text = ours.render().decode()
    assert "stakepro_commission_flush_statements_total 3.0" in text
    assert "stakepro_commission_units_paid_total 12.0" in text
    assert "other" not in text
    ours.worker_stats.update({b"commission_flush_statements": b"not a number"})
    assert "stakepro_commission_flush_statements_total" not in ours.render().decode()
