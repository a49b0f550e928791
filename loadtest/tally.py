"""The tally of one ``bets`` run, shared by its two socket drivers (loadtest/bets.py over
any :class:`loadtest.client.Socket`, loadtest/picows_bets.py from picows' frame callback):
latency histograms, the per-second series, errors, and the accounting of one reply."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram

from loadtest.options import BetsOptions

#: Latencies are recorded in microseconds, from 1 µs to 60 s, 3 significant digits.
HIST_MAX_US = 60_000_000
#: Per-second histograms (the report's series) keep 2 significant digits.
SERIES_DIGITS = 2


class Tally:
    """Counts shared by the sockets of one run (one event loop: no locks).

    Latencies are not recorded into the HDR histograms one reply at a time (``record_value``
    is pure Python, ~1.6 us): :meth:`reply` rounds each one down to the lowest value of its
    HDR bucket and counts it in a dict, and :meth:`fold` records every distinct value once
    with its count. The histograms come out identical to recording every value (same
    buckets, and min / max / mean / percentiles are read per bucket; the per-second ones
    have coarser buckets that contain whole buckets of the fine grid). The dict covers one
    segment of time: a whole second of the series, cut at the measured window's ends."""

    def __init__(self, measure_start: float, measure_end: float, t0: float = 0.0) -> None:
        self.hist = HdrHistogram(1, HIST_MAX_US, 3)
        self.t0 = t0
        #: Per whole second since ``t0``: replies, and a latency histogram.
        self.second_counts: list[int] = []
        self.second_hists: list[HdrHistogram] = []
        self.measure_start = measure_start
        self.measure_end = measure_end
        self.stop_at = measure_end
        self.bets_all = 0
        self.errors: Counter[str] = Counter()
        self.open_sockets = 0
        self.pending: list[dict[int, int]] = []
        # perf_counter_ns bounds of the measured window, and the series' start.
        self._window_ns = (int(measure_start * 1e9), int(measure_end * 1e9))
        self._t0_ns = int(t0 * 1e9)
        #: The current segment: its second (-1: before t0), whether it is in the window,
        #: where it ends, and its counts (quantized latency in us -> replies).
        self._second = -1
        self._in_window = False
        self._segment_end_ns = -1
        self._counts: dict[int, int] = {}
        self._bits = _sub_bucket_bits(self.hist)
        self._exact_below = 1 << self._bits
        assert self._bits >= _sub_bucket_bits(HdrHistogram(1, HIST_MAX_US, SERIES_DIGITS))

    def reply(self, sent_ns: int, now_ns: int) -> None:
        """One answered bet, sent and answered at these ``perf_counter_ns`` times."""
        self.bets_all += 1
        if now_ns >= self._segment_end_ns:
            self._next_segment(now_ns)
        micros = (now_ns - sent_ns) // 1000
        if micros >= self._exact_below:
            if micros > HIST_MAX_US:
                micros = HIST_MAX_US
            shift = micros.bit_length() - self._bits
            micros = micros >> shift << shift
        elif micros < 1:
            micros = 1
        counts = self._counts
        counts[micros] = counts.get(micros, 0) + 1

    def _next_segment(self, now_ns: int) -> None:
        self.fold()
        start, end = self._window_ns
        self._in_window = start <= now_ns < end
        second = (now_ns - self._t0_ns) // 1_000_000_000
        if second < 0:  # before the series starts: counted in bets_all only
            self._second = -1
            ends = [self._t0_ns]
        else:
            self._second = second
            while len(self.second_counts) <= second:
                self.second_counts.append(0)
                self.second_hists.append(HdrHistogram(1, HIST_MAX_US, SERIES_DIGITS))
            ends = [self._t0_ns + (second + 1) * 1_000_000_000]
        ends += [t for t in (start, end) if t > now_ns]
        self._segment_end_ns = min(ends)

    def fold(self) -> None:
        """Record what :meth:`reply` counted into ``hist`` and the per-second histograms."""
        counts, self._counts = self._counts, {}
        if not counts or self._second < 0:
            return
        second = self.second_hists[self._second]
        self.second_counts[self._second] += sum(counts.values())
        hist = self.hist if self._in_window else None
        for value, n in counts.items():
            second.record_value(value, n)
            if hist is not None:
                hist.record_value(value, n)

    def series(self) -> list[dict[str, float | int | None]]:
        """Per second since the start: ``{"t", "bets", "p99_ms"}``."""
        self.fold()
        return [
            {"t": i, "bets": n,
             "p99_ms": (h.get_value_at_percentile(99.0) / 1000 if n else None)}
            for i, (n, h) in enumerate(zip(self.second_counts, self.second_hists, strict=True))
        ]

    def unanswered(self) -> int:
        return sum(len(p) for p in self.pending)


def _sub_bucket_bits(hist: HdrHistogram) -> int:
    """log2 of the histogram's sub-bucket count: a value needs rounding (to a multiple of
    ``2 ** (bit_length - bits)``) once its bit length exceeds it (lowest value 1)."""
    bits: int = int(hist.sub_bucket_count).bit_length() - 1
    assert hist.unit_magnitude == 0 and 1 << bits == hist.sub_bucket_count
    return bits


def take_reply(
    message: dict[str, Any], now_ns: int, pending: dict[int, int], tally: Tally,
    options: BetsOptions,
) -> bool:
    """Account one received frame; True when it answered a bet in flight."""
    kind = message.get("type")
    if kind == "bet_result":
        sent_ns = pending.pop(message.get("id", 0), None)
        if sent_ns is None:
            tally.errors["UNKNOWN_ID"] += 1
            return False
        tally.reply(sent_ns, now_ns)
        if options.on_result is not None:
            options.on_result(message, time.time_ns())
        return True
    if kind == "error":
        tally.errors[str(message.get("code"))] += 1
        return pending.pop(message.get("id", 0), None) is not None
    return False  # balance pushes (sockets sharing a player), anything new
