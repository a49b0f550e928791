"""``python -m loadtest spectators``: many ``/ws/feed`` sockets while bets run.

Opens ``count`` spectator sockets (JSON text frames, or msgpack with ``--encoding
msgpack``), then runs the ``bets`` load in the same process (paced at ``bet_rate`` bets/s
over ``connections`` sockets with ``inflight`` each, for ``duration`` seconds), then waits up
to ``grace`` seconds for the last batches. It prints:

- **delivered batches per second**: feed frames received by all spectators over the bets'
  run, in total and per socket (the server sends at most 10 a second per socket);
- **feed lag**: receive time minus the entry's ``ts`` for every bet every spectator saw, in
  ms (HDR histogram; ``ts`` has millisecond resolution), p50 / p99 / max;
- **every bet seen**: every bet the run settled (its ``bet_result``) appears on every
  spectator: exactly (by id) on the first socket, by count on the others, and by id in the
  union of all frames.

The client stays cheap: the server broadcasts one encoded frame to every spectator, so a
frame is decoded once and the other sockets' identical copies hit a small cache, keyed by
the frame's length and last KiB (not by the whole frame); lags are tallied per frame and
millisecond of arrival, and expanded over the frame's entries at the end. With picows (the
default when installed) each frame is handled in picows' frame callback from its read
buffer, with no coroutine or future per frame. Exit 0 only when the bets run passed,
no spectator was closed and every bet was seen everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TextIO

import msgpack
from hdrh.histogram import HdrHistogram
from websockets.asyncio.client import connect

from loadtest import bets, common
from loadtest.options import BetsOptions, ServerOptions
from loadtest.wire import Encoding

HIST_MAX_US = 3_600_000_000
#: Distinct frames kept decoded (sockets lag each other by at most the server's queue).
FRAME_CACHE = 512
#: Bytes at the end of a frame that, with its length, identify it (see frame_key).
KEY_TAIL = 1024


@dataclass
class SpectatorsOptions(ServerOptions):
    """``client`` opens the feed sockets and the player sockets of the bets load."""

    count: int = 100
    #: Of the feed frames (the bets load sends msgpack).
    encoding: Encoding = "json"
    bet_rate: float = 200.0
    connections: int = 20
    inflight: int = 4
    duration: float = 10.0
    grace: float = 5.0
    connect_concurrency: int = 100
    progress: TextIO | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        return {"url": self.url, "count": self.count, "encoding": self.encoding,
                "bet_rate": self.bet_rate, "connections": self.connections,
                "inflight": self.inflight, "duration_s": self.duration, "grace_s": self.grace,
                "client": self.client}


@dataclass
class Frame:
    """One decoded feed frame: the run's bet ids in it, and its entries' ts counts."""

    ours: tuple[Any, ...]
    ts_counts: tuple[tuple[int, int], ...]
    entries: int
    #: Its index in :attr:`Shared.decoded`.
    serial: int = 0


def frame_key(payload: bytes | memoryview) -> tuple[int, bytes]:
    """What tells two feed frames apart without hashing whole frames (up to ~100 KB, each
    socket's copy its own object): the length and the last :data:`KEY_TAIL` bytes, which
    hold the last entries with their (unique) bet ids and ts. The server sends every
    spectator the same bytes, and never the same entry in two frames."""
    return len(payload), bytes(payload[-KEY_TAIL:])


class Shared:
    """State of all spectators of one run (one event loop: no locks).

    Per received frame the work is a cache lookup and a few counters: the lags are kept as
    (frame, receive ms) -> sockets, and expanded over the frame's ts counts at the end."""

    def __init__(self, prefix: str, binary: bool) -> None:
        self.prefix = prefix
        self.binary = binary
        self.cache: OrderedDict[tuple[int, bytes], Frame] = OrderedDict()
        self.decoded: list[Frame] = []
        #: (frame serial, receive time in ms) -> sockets that received it then.
        self.arrivals: dict[tuple[int, int], int] = {}
        self.union: set[Any] = set()
        self.first_socket_ids: set[Any] = set()
        self.counts: list[int] = []
        self.frames = 0
        self.frames_in_window = 0
        self.entries = 0
        self.in_window = False
        self.stopped = False
        self.closed: Counter[str] = Counter()
        self.open = 0

    def frame(self, key: tuple[int, bytes], raw: Callable[[], bytes | str]) -> Frame:
        """The decoded frame of ``key``; ``raw()`` gives its whole payload on a miss."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        data = raw()
        message = msgpack.unpackb(data) if isinstance(data, bytes) and self.binary \
            else json.loads(data)
        rows = message.get("bets", []) if isinstance(message, dict) else []
        ours = tuple(r["bet_id"] for r in rows if str(r.get("player", "")).startswith(self.prefix))
        ts = Counter(int(r["ts"]) for r in rows)
        decoded = Frame(ours, tuple(ts.items()), len(rows), len(self.decoded))
        self.decoded.append(decoded)
        self.union.update(ours)
        self.cache[key] = decoded
        if len(self.cache) > FRAME_CACHE:
            self.cache.popitem(last=False)
        return decoded

    def received(self, index: int, frame: Frame, now_ms: int) -> None:
        """Socket ``index`` received ``frame`` at ``now_ms`` (wall clock, ms)."""
        self.frames += 1
        if self.in_window:
            self.frames_in_window += 1
        self.entries += frame.entries
        key = (frame.serial, now_ms)
        arrivals = self.arrivals
        arrivals[key] = arrivals.get(key, 0) + 1
        if frame.ours:
            self.counts[index] += len(frame.ours)
            if index == 0:
                self.first_socket_ids.update(frame.ours)

    def lag_ms(self) -> Counter[int]:
        """Feed lag (receive ms - entry ts) -> entries, over every socket."""
        lag: Counter[int] = Counter()
        for (serial, now_ms), sockets in self.arrivals.items():
            for ts, n in self.decoded[serial].ts_counts:
                lag[now_ms - ts] += n * sockets
        return lag


def _feed_url(options: SpectatorsOptions) -> str:
    suffix = "?format=msgpack" if options.encoding == "msgpack" else ""
    return options.ws_url("/ws/feed") + suffix


def _opened(options: SpectatorsOptions, shared: Shared, opened: asyncio.Event) -> None:
    shared.open += 1
    if shared.open + sum(shared.closed.values()) >= options.count:
        opened.set()


async def spectate(index: int, options: SpectatorsOptions, shared: Shared,
                   gate: asyncio.Semaphore, opened: asyncio.Event, stop: asyncio.Event) -> None:
    """One spectator over websockets (when picows is not installed); it reads until
    cancelled after ``stop``."""
    try:
        async with gate:
            ws = await connect(_feed_url(options), compression=None, max_size=2**24,
                               open_timeout=options.connect_timeout, close_timeout=2,
                               ping_interval=None)
    except Exception:
        shared.closed["CONNECT"] += 1
        return
    _opened(options, shared, opened)
    try:
        while True:
            raw = await ws.recv(decode=False)
            if shared.stopped:
                break
            now_ms = time.time_ns() // 1_000_000
            shared.received(index, shared.frame(frame_key(raw), partial(bytes, raw)), now_ms)
    except asyncio.CancelledError:
        pass
    except Exception as exc:  # closed by the server (1008 too slow) or the network
        if not shared.stopped:
            shared.closed[type(exc).__name__] += 1
    finally:
        shared.open -= 1
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 3)


async def spectate_picows(index: int, options: SpectatorsOptions, shared: Shared,
                          gate: asyncio.Semaphore, opened: asyncio.Event,
                          stop: asyncio.Event) -> None:
    """One spectator over picows: every frame is handled in picows' frame callback, from
    its read buffer (only a miss of the frame cache copies the payload)."""
    import picows  # type: ignore[import-not-found,unused-ignore]

    from loadtest.picows_client import FrameListener

    binary_kind = picows.WSMsgType.BINARY
    frame, received = shared.frame, shared.received

    def on_frame(kind: Any, payload: memoryview) -> None:
        if shared.stopped:
            return
        now_ms = time.time_ns() // 1_000_000
        raw = (lambda: bytes(payload)) if kind == binary_kind else (
            lambda: bytes(payload).decode())
        received(index, frame(frame_key(payload), raw), now_ms)

    def on_closed(reason: str) -> None:
        if not shared.stopped:
            shared.closed[reason] += 1

    try:
        async with gate:
            transport, listener = await asyncio.wait_for(
                picows.ws_connect(lambda *_: FrameListener(on_frame, on_closed),
                                  _feed_url(options),
                                  websocket_handshake_timeout=options.connect_timeout,
                                  max_frame_size=2**24),
                options.connect_timeout)
    except Exception:
        shared.closed["CONNECT"] += 1
        return
    assert isinstance(listener, FrameListener)
    _opened(options, shared, opened)
    try:
        ends: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait()), listener.gone]
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
    finally:
        shared.open -= 1
        with contextlib.suppress(Exception):
            if not transport.is_disconnected:
                transport.send_close(picows.WSCloseCode.OK)
                transport.disconnect()
            await asyncio.wait_for(transport.wait_disconnected(), 3)


@dataclass
class SpectatorsReport:
    options: SpectatorsOptions
    bets: bets.BetsReport
    results: int
    lag: HdrHistogram
    shared_counts: list[int]
    union_missing: int
    first_missing: int
    frames: int
    frames_in_window: int
    entries: int
    closed: dict[str, int]
    window_s: float
    client_cpu_s: float
    wall_s: float

    @property
    def every_bet_seen(self) -> bool:
        return (self.union_missing == 0 and self.first_missing == 0
                and all(c >= self.results for c in self.shared_counts))

    @property
    def ok(self) -> bool:
        return (self.bets.ok and not self.closed and self.every_bet_seen
                and self.frames_in_window > 0)

    def lag_ms(self) -> dict[str, float | None]:
        if not self.lag.get_total_count():
            return {"p50": None, "p99": None, "max": None}
        return {"p50": self.lag.get_value_at_percentile(50.0) / 1000,
                "p99": self.lag.get_value_at_percentile(99.0) / 1000,
                "max": self.lag.get_max_value() / 1000}

    def batches_per_s(self) -> float:
        return self.frames_in_window / self.window_s if self.window_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        per_socket = self.batches_per_s() / max(1, self.options.count)
        return {
            "command": "spectators", "options": self.options.public(), "ok": self.ok,
            "spectators": self.options.count, "closed": self.closed,
            "batches": self.frames, "batches_in_window": self.frames_in_window,
            "window_s": round(self.window_s, 3),
            "batches_per_s": round(self.batches_per_s(), 1),
            "batches_per_s_per_socket": round(per_socket, 2),
            "entries_delivered": self.entries,
            "feed_lag_ms": {**self.lag_ms(), "entries": int(self.lag.get_total_count())},
            "bets_settled": self.results, "every_bet_seen": self.every_bet_seen,
            "missing": {"union": self.union_missing, "first_socket": self.first_missing,
                        "sockets_short": sum(1 for c in self.shared_counts if c < self.results)},
            "bets": {k: v for k, v in self.bets.to_dict().items() if k != "series"},
            "wall_s": round(self.wall_s, 3),
            "client": {"cpu_s": round(self.client_cpu_s, 3)},
        }

    def table(self) -> str:
        o = self.options
        lag = self.lag_ms()
        short = sum(1 for c in self.shared_counts if c < self.results)
        rows = [
            ("spectators", f"{o.count:,} /ws/feed sockets ({o.encoding}); closed:"
                           f" {dict(self.closed) or 'none'}"),
            ("bets", f"{self.bets.bets_all:,} settled at {self.bets.bets_per_s:,.1f} bets/s"
                     f" (asked {o.bet_rate:g}/s over {o.connections} sockets x {o.inflight});"
                     f" errors {self.bets.error_count}"),
            ("batches", f"{self.batches_per_s():,.1f} delivered/s in all,"
                        f" {self.batches_per_s() / max(1, o.count):.2f}/s per socket over"
                        f" {self.window_s:.1f} s ({self.entries:,} entries delivered)"),
            ("feed lag", f"p50 {common.fmt_ms(lag['p50'])}, p99 {common.fmt_ms(lag['p99'])},"
                         f" max {common.fmt_ms(lag['max'])} over"
                         f" {int(self.lag.get_total_count()):,} entries (HDR, ts in ms)"),
            ("every bet seen", f"{'yes' if self.every_bet_seen else 'NO'}: {self.results:,}"
                               f" bets; missing in union {self.union_missing}, on socket 0"
                               f" {self.first_missing}; sockets short {short}"),
            ("client CPU", f"{self.client_cpu_s:.2f} s (wall {self.wall_s:.1f} s)"),
            ("result", "OK" if self.ok else "FAIL"),
        ]
        return common.table(rows)


async def run_spectators(options: SpectatorsOptions) -> SpectatorsReport:
    if options.count < 1:
        raise ValueError("count must be positive")
    common.raise_nofile(options.count + options.connections + 256)
    clock = common.CpuClock()
    prefix = f"spec-{uuid.uuid4().hex[:8]}-"
    shared = Shared(prefix, options.encoding == "msgpack")
    shared.counts = [0] * options.count
    gate = asyncio.Semaphore(options.connect_concurrency)
    opened, stop = asyncio.Event(), asyncio.Event()
    run_one = spectate_picows if options.client == "picows" else spectate
    tasks = [asyncio.create_task(run_one(i, options, shared, gate, opened, stop))
             for i in range(options.count)]
    results: set[Any] = set()
    first_result = asyncio.Event()

    def on_result(message: dict[str, Any], _ns: int) -> None:
        results.add(message["bet_id"])
        if not shared.in_window and not first_result.is_set():
            shared.in_window = True  # batches count from the first settled bet
            first_result.set()
    try:
        await asyncio.wait_for(opened.wait(), options.connect_timeout * (
            1 + options.count // max(1, options.connect_concurrency)))
        if options.progress is not None:
            print(f"{shared.open:,} spectators open; betting ...", file=options.progress,
                  flush=True)
        bet_options = BetsOptions(
            url=options.url, http=options.http, admin_token=options.admin_token,
            connections=options.connections, inflight=options.inflight,
            duration=options.duration, ramp_up=0.0, rate=options.bet_rate,
            name_prefix=prefix, on_result=on_result, client=options.client,
            max_error_rate=0.0,
        )

        report_task = asyncio.create_task(bets.run_bets(bet_options))
        first = asyncio.create_task(first_result.wait())
        await asyncio.wait([report_task, first], return_when=asyncio.FIRST_COMPLETED)
        t0 = time.perf_counter()
        bet_report = await report_task  # to the end of the bets' drain
        first.cancel()
        shared.in_window = False
        window_s = time.perf_counter() - t0
        deadline = time.perf_counter() + options.grace
        while time.perf_counter() < deadline:
            if (results <= shared.union and results <= shared.first_socket_ids
                    and all(c >= len(results) for c in shared.counts)):
                break
            await asyncio.sleep(0.05)
    finally:
        shared.stopped = True
        stop.set()
        if options.client != "picows":
            for task in tasks:
                task.cancel()  # blocked in recv
        await asyncio.gather(*tasks, return_exceptions=True)
    hist = HdrHistogram(1, HIST_MAX_US, 3)
    for lag, n in shared.lag_ms().items():
        hist.record_value(min(max(1, lag * 1000), HIST_MAX_US), n)
    return SpectatorsReport(
        options=options, bets=bet_report, results=len(results), lag=hist,
        shared_counts=shared.counts, union_missing=len(results - shared.union),
        first_missing=len(results - shared.first_socket_ids), frames=shared.frames,
        frames_in_window=shared.frames_in_window, entries=shared.entries,
        closed=dict(shared.closed), window_s=window_s, client_cpu_s=clock.cpu_s(),
        wall_s=clock.wall_s(),
    )
