"""The public bet feed: every settled bet of every server instance, to every spectator of
``/ws/feed``, in batches.

Path of one bet (STYLE.md point 13: broadcast without stalls)::

    PlaySession._bet_done --add()--> local outbox --publisher, every feed_interval_s-->
    SPUBLISH feed_channel (one msgpack list per tick and instance) --Hub--> inbox of every
    instance with spectators --broadcast, at once unless the last one is younger than
    feed_interval_s--> one frame per encoding, encoded and framed once --> written to each
    spectator's socket (server/wslink.py)

Nothing on this path waits on a consumer: :meth:`Feed.add` is O(1) and never blocks a bet;
the outbox and the inbox are bounded (the oldest entries are dropped and counted); a
spectator with more than ``feed_queue_batches`` frames' worth of bytes unread is closed
(1008, "too slow", like a slow player socket) instead of being waited on. Each socket gets
at most one frame per ``feed_interval_s``: a batch that arrives sooner waits for the end of
that interval, and joins whatever else arrived meanwhile.

An instance subscribes to the feed channel only while it has a spectator: an instance that
serves players only does not decode every other instance's bets ten times a second.
Subscribing and unsubscribing are serialised by a lock and retried every interval if
Redis refused them, so a spectator never stays connected to an unsubscribed instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from operator import itemgetter
from typing import Any, Protocol
from urllib.parse import parse_qs

import msgpack
import structlog
from redis.exceptions import RedisError

from games.bets import Checked
from plumbing.redisclient import Client
from plumbing.settings import Settings
from server import codec
from server.codec import Encoding
from server.metrics import Metrics
from server.pubsub import Hub
from server.wslink import Endpoint, Link, Receive, Send, framed

log = structlog.get_logger(__name__)

#: Settled bets of this instance waiting for the publisher; past this the oldest are dropped.
OUTBOX_LIMIT = 5000
#: Received bets (all instances) waiting for the broadcaster, i.e. the most bets one frame
#: carries (about 500 KB of JSON); past this the oldest are dropped.
INBOX_LIMIT = 2000
#: Frames a spectator may send (they are ignored): sustained per second, and burst.
CLIENT_FRAMES_PER_S = 5.0
CLIENT_FRAMES_BURST = 20
#: How long a dropped spectator's close frame may wait for its socket to become writable.
CLOSE_TIMEOUT_S = 5.0


#: The fields of one feed entry, in the order the instances send them to each other: on the
#: feed channel an entry is a list (no keys to pack or parse ten times a second for every
#: bet); the broadcaster turns it into the protocol's map. A map with these keys is accepted
#: too (the earlier format: docs/decisions.md, "Formats still read").
FEED_FIELDS = ("bet_id", "player", "currency", "amount", "target", "direction", "roll", "win",
               "multiplier", "payout", "ts")


def bet_entry(player: str, checked: Checked, reply: Mapping[str, Any]) -> tuple[Any, ...]:
    """One feed entry, values in the wire formats of the protocol, in FEED_FIELDS order.
    ``player`` is a display name; ``reply`` is the bet's ``bet_result``, whose fields are
    already formatted."""
    return (
        reply["bet_id"], player, checked.spec.currency.code, checked.amount_text,
        checked.target_text, checked.spec.direction, reply["roll"], reply["win"],
        reply["multiplier"], reply["payout"], time.time_ns() // 1_000_000,
    )


class Sink(Protocol):
    encoding: Encoding

    def offer(self, payload: str | bytes, wire: bytes) -> bool:
        """Send one frame without waiting (``wire``: the payload framed for the socket, built
        once for every spectator); False if the sink is (now) dropped as too slow."""
        ...


class Feed:
    def __init__(
        self, redis: Client, hub: Hub, channel: str, metrics: Metrics,
        interval_s: float,
    ) -> None:
        self._redis = redis
        self._hub = hub
        self._channel = channel
        self._metrics = metrics
        self._interval = interval_s
        self._outbox: deque[tuple[Any, ...]] = deque()
        self._inbox: deque[dict[str, Any]] = deque()
        self._sinks: set[Sink] = set()
        self._subscribed = False
        self._sub_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        #: loop.time() of the last broadcast, and the pending one if scheduled.
        self._last_broadcast = 0.0
        self._broadcast_handle: asyncio.TimerHandle | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._every_tick(self.publish), name="feed-publisher"),
            asyncio.create_task(self._every_tick(self._reconcile_tick), name="feed-subscriber"),
        ]

    async def close(self) -> None:
        if self._broadcast_handle is not None:
            self._broadcast_handle.cancel()
            self._broadcast_handle = None
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: redis-py can swallow a cancellation raised inside a command.
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.publish(), 1.0)  # the last bets settled here

    async def _every_tick(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` every interval on a fixed cadence (a slow step or a busy loop does
        not push the later ticks back; missed ticks are skipped, not run in a burst)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self._interval
            now = loop.time()
            if due < now:
                due = now
            await asyncio.sleep(due - now)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("feed_tick_failed")

    # -- this instance's bets -> Redis -------------------------------------------------

    def add(self, entry: tuple[Any, ...]) -> None:
        """Queue one settled bet (:func:`bet_entry`) for the next publish: O(1), never
        waits."""
        if len(self._outbox) >= OUTBOX_LIMIT:
            self._outbox.popleft()
            self._metrics.feed_dropped_bets.labels("outbox_full").inc()
        self._outbox.append(entry)

    async def publish(self) -> None:
        """PUBLISH everything queued since the last call as one message."""
        if not self._outbox:
            return
        batch = list(self._outbox)
        self._outbox.clear()
        try:
            await self._redis.spublish(self._channel, msgpack.packb(batch))
        except (RedisError, OSError) as exc:
            self._metrics.feed_dropped_bets.labels("publish_failed").inc(len(batch))
            log.warning("feed_publish_failed", error=str(exc), bets=len(batch))
            return
        self._metrics.feed_batches.labels("published").inc()

    # -- Redis -> spectators -----------------------------------------------------------

    def received(self, data: bytes) -> None:
        """Hub handler: one instance's batch joins the inbox, broadcast at once unless the
        last broadcast is less than one interval old (then at the end of that interval)."""
        try:
            batch = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            batch = None
        if not isinstance(batch, list):
            log.warning("feed_message_ignored", size=len(data))
            return
        width = len(FEED_FIELDS)
        for item in batch:
            if type(item) is list and len(item) == width:
                entry = dict(zip(FEED_FIELDS, item, strict=True))
            elif isinstance(item, dict):
                entry = item
            else:
                continue
            if not isinstance(entry.get("ts"), int):
                continue
            if len(self._inbox) >= INBOX_LIMIT:
                self._inbox.popleft()
                self._metrics.feed_dropped_bets.labels("inbox_full").inc()
            self._inbox.append(entry)
        if self._inbox and self._broadcast_handle is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_broadcast + self._interval - loop.time())
            self._broadcast_handle = loop.call_later(delay, self._scheduled_broadcast)

    def _scheduled_broadcast(self) -> None:
        self._broadcast_handle = None
        self._last_broadcast = asyncio.get_running_loop().time()
        try:
            self.broadcast()
        except Exception:
            log.exception("feed_broadcast_failed")

    def broadcast(self) -> None:
        """Offer the inbox as one frame (encoded once per encoding) to every spectator."""
        if not self._inbox:
            return
        bets = sorted(self._inbox, key=itemgetter("ts"))  # stable: newest last
        self._inbox.clear()
        if not self._sinks:
            return
        message = {"type": "feed", "bets": bets}
        frames: dict[Encoding, tuple[str | bytes, bytes]] = {}
        for sink in tuple(self._sinks):
            frame = frames.get(sink.encoding)
            if frame is None:
                payload = codec.encode(message, sink.encoding)
                frame = frames[sink.encoding] = (payload, framed(payload))
            if not sink.offer(*frame):
                self._sinks.discard(sink)
                self._metrics.feed_dropped_spectators.labels("too_slow").inc()
        self._metrics.feed_batches.labels("broadcast").inc()

    async def _reconcile_tick(self) -> None:
        """Retry a subscription change Redis refused (see _reconcile)."""
        if bool(self._sinks) != self._subscribed:
            await self._reconcile()

    async def join(self, sink: Sink) -> None:
        self._sinks.add(sink)
        await self._reconcile()

    async def leave(self, sink: Sink) -> None:
        self._sinks.discard(sink)
        await self._reconcile()

    async def _reconcile(self) -> None:
        """Be subscribed to the feed channel iff some spectator is connected here."""
        async with self._sub_lock:
            try:
                if self._sinks and not self._subscribed:
                    await self._hub.subscribe(self._channel, self.received)
                    self._subscribed = True
                elif not self._sinks and self._subscribed:
                    await self._hub.unsubscribe(self._channel)
                    self._subscribed = False
                    self._inbox.clear()
            except (RedisError, OSError) as exc:
                log.warning("feed_subscription_failed", error=str(exc))

    @property
    def spectators(self) -> int:
        return len(self._sinks)


class Spectator:
    """One ``/ws/feed`` socket, written to straight (server/wslink.py) and closed when too
    slow (the module docstring). What the client sends is read and ignored (so its close
    frame is seen), but a client that sends more than a few frames a second is closed
    (1008)."""

    def __init__(self, endpoint: Endpoint, encoding: Encoding, queue_batches: int,
                 metrics: Metrics) -> None:
        self.endpoint = endpoint
        self.encoding: Encoding = encoding
        self.link: Link | None = None
        self._queue_batches = queue_batches
        self._metrics = metrics
        self._closing = False
        self._tokens = float(CLIENT_FRAMES_BURST)
        self._refilled = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()

    def offer(self, payload: str | bytes, wire: bytes) -> bool:
        if self._closing or self.link is None:
            return True  # closing for another reason; Feed.leave() follows
        unread = self.link.write_prepared(payload, wire)
        if unread > self._queue_batches * len(wire):
            self._close(1008, "too slow")
            return False
        return True

    def on_frame(self, data: str | bytes) -> None:
        now = time.monotonic()
        self._tokens = min(
            float(CLIENT_FRAMES_BURST),
            self._tokens + (now - self._refilled) * CLIENT_FRAMES_PER_S,
        )
        self._refilled = now
        if self._tokens < 1:
            if not self._closing:
                self._metrics.feed_dropped_spectators.labels("chatty").inc()
            self._close(1008, "spectators do not send frames")
            return
        self._tokens -= 1

    def _close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        task = asyncio.get_running_loop().create_task(
            asyncio.wait_for(self.endpoint.close(code, reason), CLOSE_TIMEOUT_S)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        self.link = self.endpoint.attach(self)
        try:
            await self.endpoint.until_disconnect()
        finally:
            self._closing = True
            for task in list(self._tasks):
                with contextlib.suppress(BaseException):
                    await task
            await self.endpoint.finish()


class FeedHost(Protocol):
    """What ``/ws/feed`` needs of its process: :class:`server.services.Services`, which
    builds the :class:`Feed` (so this module does not import it back)."""

    settings: Settings
    metrics: Metrics
    feed: Feed


async def feed_endpoint(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The ASGI app of ``/ws/feed`` (plain ASGI: frames go straight to the sockets)."""
    services: FeedHost = scope["app"].state.services
    endpoint = Endpoint(scope, receive, send)
    if not await endpoint.accept():
        return
    encoding = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(
        "format", ["json"])[-1]
    if encoding not in ("json", "msgpack"):
        await endpoint.close(1008, "format must be json or msgpack")
        with contextlib.suppress(Exception):
            await endpoint.until_disconnect()
        return
    spectator = Spectator(
        endpoint, "msgpack" if encoding == "msgpack" else "json",
        services.settings.feed_queue_batches, services.metrics,
    )
    gauge = services.metrics.sockets.labels("feed")
    gauge.inc()
    try:
        await services.feed.join(spectator)
        await spectator.run()
    finally:
        await services.feed.leave(spectator)
        gauge.dec()
