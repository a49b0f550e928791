"""``python -m loadtest bets``: closed-loop bets over many player sockets.

The run: create the players through the admin API (each credited ``deposit``), scrape the
server's ``/metrics``, open the sockets spread over ``ramp_up`` seconds (each signs in as its
own player, or sockets share players when ``players < connections``), and keep ``inflight``
bets in flight on every socket: a reply (result or error) sends the next bet. After the
ramp-up, ``duration`` seconds are measured: replies that arrive then go into the latency
histogram and the throughput. Then no new bets are sent, the sockets wait up to
``drain_timeout`` for their last replies and close, and ``/metrics`` is scraped again for the
server-side bet time. Errors (protocol codes, and the client's own ``CONNECT``, ``CLOSED``,
``UNANSWERED``) count in every phase. A hard timeout bounds the whole run.

With ``rate`` (bets/s over all sockets) the load is paced instead: each socket sends at
``rate / connections`` a second, still never more than ``inflight`` unanswered (a full
socket waits for a reply, so ``rate`` is a ceiling). ``--report FILE.html`` writes
throughput and p99 latency per second as a self-contained HTML page (inline SVG).

Wall time is about ``ramp_up + duration + drain``, plus player creation.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from hdrh.histogram import HdrHistogram

from loadtest import common, serverstats
from loadtest.client import Socket, open_socket
from loadtest.options import BetsOptions
from loadtest.players import Player, create_players
from loadtest.report import write_html
from loadtest.tally import Tally, take_reply

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}
SHARED_ID_BITS = 32


async def drive(
    index: int, player: Player, options: BetsOptions, tally: Tally, start_at: float
) -> None:
    """One socket: sign in, keep ``inflight`` bets in flight until ``tally.stop_at``, drain."""
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    if time.perf_counter() >= tally.stop_at:
        return
    try:
        sock = await open_socket(options.play_url, options.encoding, options.connect_timeout,
                                 options.client)
    except Exception:
        tally.errors["CONNECT"] += 1
        return
    pending: dict[int, int] = {}
    tally.pending.append(pending)
    opened = False
    try:
        await sock.send({"type": "auth", "token": player.token})
        welcome = await asyncio.wait_for(_first_reply(sock), options.connect_timeout)
        if welcome.get("type") != "welcome":
            tally.errors[f"AUTH_{welcome.get('code', welcome.get('type'))}"] += 1
            return
        tally.open_sockets += 1
        opened = True
        await _bet_loop(index, sock, pending, options, tally)
    except (ConnectionError, TimeoutError, ValueError):
        tally.errors["CLOSED"] += 1
    finally:
        if opened:
            tally.open_sockets -= 1
        await sock.close()


async def _first_reply(sock: Socket) -> dict[str, Any]:
    """The answer to ``auth``: a balance push (another socket of the same player betting)
    can arrive before the welcome."""
    while True:
        message = await sock.recv()
        if message.get("type") != "balance":
            return message


async def _bet_loop(
    index: int, sock: Socket, pending: dict[int, int], options: BetsOptions, tally: Tally
) -> None:
    base = (index + 1) << SHARED_ID_BITS
    serial = 0
    template: dict[str, Any] = {
        "type": "bet", "id": 0, "currency": options.currency, "amount": options.amount,
        "target": options.target, "direction": options.direction,
    }
    clock = time.perf_counter_ns
    stop_ns = int(tally.stop_at * 1e9)

    async def send_one() -> None:
        nonlocal serial
        serial += 1
        bet_id = base + serial
        template["id"] = bet_id
        pending[bet_id] = clock()
        await sock.send(template)

    loop = asyncio.get_running_loop()
    drain_deadline = loop.time() + (tally.stop_at - time.perf_counter()) + options.drain_timeout
    if options.rate:
        await _paced_loop(sock, pending, options, tally, send_one, drain_deadline)
        return
    for _ in range(options.inflight):
        await send_one()
    try:
        async with asyncio.timeout_at(drain_deadline):
            while pending:
                message = await sock.recv()
                now_ns = clock()
                if take_reply(message, now_ns, pending, tally, options) and now_ns < stop_ns:
                    await send_one()
    except TimeoutError:
        tally.errors["UNANSWERED"] += len(pending)
        pending.clear()


async def _paced_loop(
    sock: Socket, pending: dict[int, int], options: BetsOptions, tally: Tally,
    send_one: Callable[[], Any], drain_deadline: float,
) -> None:
    """``rate / connections`` bets a second on this socket, at most ``inflight`` unanswered;
    a receiver task takes the replies."""
    assert options.rate
    interval = options.connections / options.rate
    loop = asyncio.get_running_loop()
    slot = asyncio.Event()
    slot.set()
    clock = time.perf_counter_ns

    async def receive() -> None:
        while True:
            message = await sock.recv()
            answered = take_reply(message, clock(), pending, tally, options)
            if answered and len(pending) < options.inflight:
                slot.set()

    receiver = asyncio.create_task(receive())
    try:
        next_at = loop.time()
        stop = loop.time() + (tally.stop_at - time.perf_counter())
        # (loop.time() too: a socket kept full to the end would spin on the slot otherwise)
        while next_at < stop and loop.time() < stop and not receiver.done():
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if len(pending) >= options.inflight:
                slot.clear()
                waited = asyncio.ensure_future(slot.wait())
                await asyncio.wait([waited, receiver], return_when=asyncio.FIRST_COMPLETED,
                                   timeout=max(0.0, stop - loop.time()))
                waited.cancel()
                if len(pending) >= options.inflight:
                    continue
            await send_one()
            next_at = max(next_at + interval, loop.time() - interval)  # no catch-up burst
        while pending and not receiver.done() and loop.time() < drain_deadline:
            await asyncio.wait([receiver], timeout=min(0.05, drain_deadline - loop.time()))
        if receiver.done() and not receiver.cancelled():
            failure = receiver.exception()
            if failure is not None:
                raise failure
        if pending:
            tally.errors["UNANSWERED"] += len(pending)
            pending.clear()
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await receiver


async def progress(options: BetsOptions, tally: Tally, t0: float, out: TextIO) -> None:
    """One line a second: elapsed, phase, sockets, bets/s over the last second, errors, p99."""
    last = 0
    while True:
        await asyncio.sleep(1.0)
        now = time.perf_counter()
        done = tally.bets_all
        middle = now - 0.5  # the phase of the second just gone
        phase = ("ramp-up" if middle < tally.measure_start
                 else "measure" if middle < tally.measure_end else "drain")
        tally.fold()
        p99 = (f"{tally.hist.get_value_at_percentile(99.0) / 1000:.2f} ms"
               if tally.hist.get_total_count() else "-")
        print(
            f"[{now - t0:5.1f}s {phase:>7}] sockets {tally.open_sockets:>5}"
            f"  bets/s {done - last:>7,}  bets {done:>9,}  errors {sum(tally.errors.values()):>6,}"
            f"  p99 so far {p99}",
            file=out, flush=True,
        )
        last = done


@dataclass
class BetsReport:
    options: BetsOptions
    measured_s: float
    hist: HdrHistogram
    bets_all: int
    errors: dict[str, int]
    client_cpu_s: float
    client_cpu_all_s: float
    server_bet_time: serverstats.ServerBetTime | None
    server_pids: list[int]
    server_cpu_s: float | None
    server_rss_bytes: int | None
    #: The server answered from this very process (tests): its CPU is in the client's.
    server_in_client: bool
    hard_timeout: bool
    setup_s: float
    series: list[dict[str, float | int | None]] = field(default_factory=list)
    #: Seconds from the start of the series to the measured window's start and end.
    window: tuple[float, float] = (0.0, 0.0)

    @property
    def bets(self) -> int:
        return int(self.hist.get_total_count())

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        attempts = self.bets_all + self.error_count
        return self.error_count / attempts if attempts else 0.0

    @property
    def bets_per_s(self) -> float:
        return self.bets / self.measured_s if self.measured_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.bets > 0 and self.error_rate <= self.options.max_error_rate

    def latency_ms(self) -> dict[str, float | None]:
        if not self.bets:
            return {k: None for k in (*PERCENTILES, "min", "mean", "max")}
        values: dict[str, float | None] = {
            k: self.hist.get_value_at_percentile(p) / 1000 for k, p in PERCENTILES.items()
        }
        values["min"] = self.hist.get_min_value() / 1000
        values["mean"] = round(self.hist.get_mean_value() / 1000, 3)
        values["max"] = self.hist.get_max_value() / 1000
        return values

    def to_dict(self) -> dict[str, Any]:
        server: dict[str, Any] = {"pids": self.server_pids, "in_client_process":
                                  self.server_in_client}
        if self.server_bet_time is not None:
            t = self.server_bet_time
            server["bet_time_ms"] = {
                "source": "stakepro_bet_seconds bucket deltas, linear inside a bucket (estimate)",
                "count": t.count, "median": _finite(t.p50_ms), "p99": _finite(t.p99_ms),
                "mean": _round(t.mean_ms), "top_bucket": t.top_ms,
                "above_top_bucket": [k for k, v in (("median", t.p50_ms), ("p99", t.p99_ms))
                                     if v is not None and math.isinf(v)],
            }
            server["errors"] = t.errors
        if self.server_cpu_s is not None:
            server["cpu_s"] = round(self.server_cpu_s, 3)
            server["cpu_cores"] = round(self.server_cpu_s / self.measured_s, 3)
            server["cpu_ms_per_1000_bets"] = _per_1000(self.server_cpu_s, self.bets)
        if self.server_rss_bytes is not None:
            server["rss_bytes"] = self.server_rss_bytes
        return {
            "command": "bets",
            "options": self.options.public(),
            "ok": self.ok,
            "hard_timeout": self.hard_timeout,
            "setup_s": round(self.setup_s, 3),
            "measured_s": round(self.measured_s, 3),
            "bets": self.bets,
            "bets_all": self.bets_all,
            "bets_per_s": round(self.bets_per_s, 1),
            "histogram_count": int(self.hist.get_total_count()),
            "latency_ms": self.latency_ms(),
            "errors": dict(sorted(self.errors.items())),
            "error_count": self.error_count,
            "error_rate": self.error_rate,
            "client": {
                "cpu_s": round(self.client_cpu_s, 3),
                "cpu_cores": round(self.client_cpu_s / self.measured_s, 3)
                if self.measured_s > 0 else None,
                "cpu_ms_per_1000_bets": _per_1000(self.client_cpu_s, self.bets),
                "cpu_s_whole_run": round(self.client_cpu_all_s, 3),
            },
            "server": server,
            "series": self.series,
            "measured_window_s": [round(self.window[0], 3), round(self.window[1], 3)],
        }

    def table(self) -> str:
        o = self.options
        lat = self.latency_ms()
        rows: list[tuple[str, str]] = [
            ("target", f"{o.play_url}  ({o.encoding})"),
            ("load", f"{o.connections} sockets x {o.inflight} in flight,"
                     f" {o.players or o.connections} players, {o.amount} {o.currency}"
                     f" {o.direction} {o.target}"),
            ("measured", f"{self.measured_s:.1f} s after a {o.ramp_up:g} s ramp-up"
                         + ("  (HARD TIMEOUT)" if self.hard_timeout else "")),
            ("bets", f"{self.bets:,} measured, {self.bets_all:,} in the whole run"),
            ("throughput", f"{self.bets_per_s:,.1f} bets/s"),
        ]
        if self.bets:
            rows.append(("latency (client)", "  ".join(
                f"{k.replace('_', '.')} {lat[k]:.3f} ms" for k in (*PERCENTILES, "max")
                if lat[k] is not None
            ) + "  (HDR histogram)"))
        errs = ", ".join(f"{c} {n:,}" for c, n in sorted(self.errors.items())) or "none"
        rows.append(("errors", f"{self.error_count:,} ({self.error_rate:.3%};"
                               f" limit {o.max_error_rate:.3%}): {errs}"))
        t = self.server_bet_time
        if t is not None and t.p50_ms is not None:
            rows.append(("server bet time", f"median ~{_ms(t.p50_ms, t.top_ms)},"
                         f" p99 ~{_ms(t.p99_ms, t.top_ms)}, mean {_fmt(t.mean_ms)} ms"
                         f" over {t.count:,} bets (estimate from /metrics buckets)"))
        elif t is None:
            rows.append(("server bet time", "unknown (/metrics not readable)"))
        else:
            rows.append(("server bet time", "no bet settled"))
        if self.server_in_client:
            rows.append(("server process", "in this process (its CPU is in the client's)"))
        elif self.server_cpu_s is not None:
            rss = (f", RSS {self.server_rss_bytes / 2**20:,.0f} MiB"
                   if self.server_rss_bytes is not None else "")
            rows.append(("server process", f"pid {','.join(map(str, self.server_pids))}:"
                         f" {self.server_cpu_s / self.measured_s:.2f} cores,"
                         f" {_fmt(_per_1000(self.server_cpu_s, self.bets))} ms CPU"
                         f" per 1,000 bets{rss}"))
        cores = (f"{self.client_cpu_s / self.measured_s:.2f}" if self.measured_s >= 0.01
                 else "-")  # every socket failed at once: no window to divide by
        rows.append(("client CPU", f"{cores} cores,"
                     f" {_fmt(_per_1000(self.client_cpu_s, self.bets))} ms per 1,000 bets"
                     f" ({o.client}); {self.client_cpu_all_s:.2f} s in the whole run"))
        rows.append(("result", "OK" if self.ok else "FAIL"))
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: a quantile above the top bucket is null (see above_top_bucket)."""
    return None if value is None or math.isinf(value) else round(value, 3)


def _ms(value: float | None, top: float | None) -> str:
    if value is not None and math.isinf(value):
        return f"> {_fmt(top)} ms (above the top bucket)"
    return f"{_fmt(value)} ms"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _per_1000(cpu_s: float, bets: int) -> float | None:
    return round(cpu_s / bets * 1e6, 3) if bets else None


async def run_bets(options: BetsOptions) -> BetsReport:
    """The whole run; raises :class:`SetupError` when the players cannot be created."""
    if options.connections < 1 or options.inflight < 1 or options.duration <= 0:
        raise ValueError("connections, inflight and duration must be positive")
    setup_started = time.perf_counter()
    players = await create_players(
        options.http_url, options.admin_token, options.players or options.connections,
        options.currency, options.deposit, name_prefix=options.name_prefix,
    )
    setup_s = time.perf_counter() - setup_started
    pids, server_in_client = common.server_pids(options.url, options.server_pid)
    before = await serverstats.scrape(options.http_url)

    t0 = time.perf_counter()
    tally = Tally(t0 + options.ramp_up, t0 + options.ramp_up + options.duration, t0)
    cpu_all0 = time.process_time()
    if options.client == "picows":
        from loadtest.picows_bets import BetTemplate, Pacer, drive_picows

        template = BetTemplate(options)
        pacer = Pacer(options, tally.stop_at) if options.rate else None
        workers = [
            asyncio.create_task(drive_picows(
                i, players[i % len(players)], options, tally,
                t0 + options.ramp_up * i / options.connections, template, pacer,
            ))
            for i in range(options.connections)
        ]
    else:
        workers = [
            asyncio.create_task(drive(
                i, players[i % len(players)], options, tally,
                t0 + options.ramp_up * i / options.connections,
            ))
            for i in range(options.connections)
        ]
    reporter = (asyncio.create_task(progress(options, tally, t0, options.progress))
                if options.progress is not None else None)

    async def window() -> tuple[float, float | None]:
        """Client and server CPU over the measured window."""
        await asyncio.sleep(max(0.0, tally.measure_start - time.perf_counter()))
        c0, s0 = time.process_time(), common.process_totals(pids)[0]
        await asyncio.sleep(max(0.0, tally.measure_end - time.perf_counter()))
        c1, s1 = time.process_time(), common.process_totals(pids)[0]
        return c1 - c0, (s1 - s0 if s0 is not None and s1 is not None else None)

    meter = asyncio.create_task(window())
    hard_timeout = False
    limit = options.ramp_up + options.duration + options.drain_timeout + options.connect_timeout
    try:
        async with asyncio.timeout(limit + 5):
            await asyncio.gather(*workers)
    except TimeoutError:
        hard_timeout = True
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        tally.errors["UNANSWERED"] += tally.unanswered()
    finally:
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    if not meter.done():  # every socket failed early: the window is cut short
        meter.cancel()
        tally.measure_end = time.perf_counter()
        client_cpu, server_cpu = time.process_time() - cpu_all0, None
    else:
        client_cpu, server_cpu = meter.result()
    client_cpu_all = time.process_time() - cpu_all0
    tally.fold()
    after = await serverstats.scrape(options.http_url)
    _, rss = common.process_totals(pids)
    return BetsReport(
        options=options,
        measured_s=max(0.0, min(tally.measure_end, time.perf_counter()) - tally.measure_start),
        hist=tally.hist,
        bets_all=tally.bets_all,
        errors=dict(tally.errors),
        client_cpu_s=client_cpu,
        client_cpu_all_s=client_cpu_all,
        server_bet_time=(serverstats.bet_time(before, after)
                         if before is not None and after is not None else None),
        server_pids=pids,
        server_cpu_s=server_cpu,
        server_rss_bytes=rss,
        server_in_client=server_in_client,
        hard_timeout=hard_timeout,
        setup_s=setup_s,
        series=tally.series(),
        window=(options.ramp_up, options.ramp_up + options.duration),
    )


def main(options: BetsOptions, as_json: bool, report_path: str | None = None) -> int:
    """Run, print the table (or one JSON object) to stdout; 0 when the run passed. With
    ``report_path``, also write the HTML report there."""

    def write(report: BetsReport) -> None:
        if report_path is not None:
            write_html(report, report_path)
            print(f"report written to {report_path}", file=sys.stderr)

    return common.cli_main(lambda: run_bets(options), as_json, write)
