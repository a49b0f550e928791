"""The public bet feed: every settled bet of every server instance, to every spectator of
``/ws/feed``, in batches.

Path of one bet (STYLE.md point 13: broadcast without stalls)::

    PlaySession._bet --add()--> local outbox --publisher, every feed_interval_s-->
    PUBLISH feed_channel (one msgpack list per tick and instance) --Hub--> inbox of every
    instance with spectators --broadcaster, every feed_interval_s--> one frame per encoding,
    encoded once --> each spectator's bounded queue --> its own writer task --> socket

Nothing on this path waits on a consumer: :meth:`Feed.add` is O(1) and never blocks a bet;
the outbox and the inbox are bounded (the oldest entries are dropped and counted); a
spectator whose queue is full is closed (1008, "too slow", like a slow player socket)
instead of being waited on. Each socket therefore gets at most one frame per
``feed_interval_s`` (the broadcaster sleeps a full interval after each tick).

An instance subscribes to the feed channel only while it has a spectator: an instance that
serves players only does not decode every other instance's bets ten times a second.
Subscribing and unsubscribing are serialised by a lock and retried by the broadcaster tick if
Redis refused them, so a spectator never stays connected to an unsubscribed instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketState

from games.bets import Checked
from server import codec
from server.codec import Encoding
from server.metrics import Metrics
from server.pubsub import Hub

if TYPE_CHECKING:
    from server.services import Services

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


def bet_entry(player: str, checked: Checked, reply: Mapping[str, Any]) -> dict[str, Any]:
    """One feed entry, in the wire formats of the protocol. ``player`` is a display name;
    ``reply`` is the bet's ``bet_result``, whose fields are already formatted."""
    return {
        "bet_id": reply["bet_id"],
        "player": player,
        "currency": checked.spec.currency.code,
        "amount": checked.amount_text,
        "target": checked.target_text,
        "direction": checked.spec.direction,
        "roll": reply["roll"],
        "win": reply["win"],
        "multiplier": reply["multiplier"],
        "payout": reply["payout"],
        "ts": time.time_ns() // 1_000_000,
    }


class Sink(Protocol):
    encoding: Encoding

    def offer(self, frame: str | bytes) -> bool:
        """Queue one frame without waiting; False if the sink is (now) dropped."""
        ...


class Feed:
    def __init__(
        self, redis: aioredis.Redis, hub: Hub, channel: str, metrics: Metrics,
        interval_s: float,
    ) -> None:
        self._redis = redis
        self._hub = hub
        self._channel = channel
        self._metrics = metrics
        self._interval = interval_s
        self._outbox: deque[dict[str, Any]] = deque()
        self._inbox: deque[dict[str, Any]] = deque()
        self._sinks: set[Sink] = set()
        self._subscribed = False
        self._sub_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._every_tick(self.publish), name="feed-publisher"),
            asyncio.create_task(self._every_tick(self._broadcast_tick), name="feed-broadcaster"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: redis-py can swallow a cancellation raised inside a command.
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.publish(), 1.0)  # the last bets settled here

    async def _every_tick(self, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("feed_tick_failed")

    # -- this instance's bets -> Redis -------------------------------------------------

    def add(self, entry: dict[str, Any]) -> None:
        """Queue one settled bet for the next publish: O(1), never waits."""
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
            await self._redis.publish(self._channel, msgpack.packb(batch))
        except (RedisError, OSError) as exc:
            self._metrics.feed_dropped_bets.labels("publish_failed").inc(len(batch))
            log.warning("feed_publish_failed", error=str(exc), bets=len(batch))
            return
        self._metrics.feed_batches.labels("published").inc()

    # -- Redis -> spectators -----------------------------------------------------------

    def received(self, data: bytes) -> None:
        """Hub handler: one instance's batch joins the inbox."""
        try:
            batch = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            batch = None
        if not isinstance(batch, list):
            log.warning("feed_message_ignored", size=len(data))
            return
        for entry in batch:
            if not isinstance(entry, dict) or not isinstance(entry.get("ts"), int):
                continue
            if len(self._inbox) >= INBOX_LIMIT:
                self._inbox.popleft()
                self._metrics.feed_dropped_bets.labels("inbox_full").inc()
            self._inbox.append(entry)

    def broadcast(self) -> None:
        """Offer the inbox as one frame (encoded once per encoding) to every spectator."""
        if not self._inbox:
            return
        bets = sorted(self._inbox, key=itemgetter("ts"))  # stable: newest last
        self._inbox.clear()
        if not self._sinks:
            return
        message = {"type": "feed", "bets": bets}
        frames: dict[Encoding, str | bytes] = {}
        for sink in tuple(self._sinks):
            frame = frames.get(sink.encoding)
            if frame is None:
                frame = frames[sink.encoding] = codec.encode(message, sink.encoding)
            if not sink.offer(frame):
                self._sinks.discard(sink)
                self._metrics.feed_dropped_spectators.labels("too_slow").inc()
        self._metrics.feed_batches.labels("broadcast").inc()

    async def _broadcast_tick(self) -> None:
        if bool(self._sinks) != self._subscribed:
            await self._reconcile()
        self.broadcast()

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
    """One ``/ws/feed`` socket: a bounded queue of frames, a writer task, a reader task that
    reads and ignores what the client sends (so its close frame is seen)."""

    def __init__(self, ws: WebSocket, encoding: Encoding, queue_batches: int) -> None:
        self.ws = ws
        self.encoding: Encoding = encoding
        self._out: asyncio.Queue[str | bytes] = asyncio.Queue(queue_batches)
        self._dropped = asyncio.Event()
        self._closing = False
        self._tokens = float(CLIENT_FRAMES_BURST)
        self._refilled = time.monotonic()

    def offer(self, frame: str | bytes) -> bool:
        if self._closing:
            return True  # closing for another reason; Feed.leave() follows
        try:
            self._out.put_nowait(frame)
        except asyncio.QueueFull:
            self._closing = True
            self._dropped.set()
            return False
        return True

    async def _write(self) -> None:
        while True:
            frame = await self._out.get()
            if isinstance(frame, str):
                await self.ws.send_text(frame)
            else:
                await self.ws.send_bytes(frame)

    async def _read(self) -> bool:
        """Read until the client leaves (False) or talks too much (True)."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return False
            now = time.monotonic()
            self._tokens = min(
                float(CLIENT_FRAMES_BURST),
                self._tokens + (now - self._refilled) * CLIENT_FRAMES_PER_S,
            )
            self._refilled = now
            if self._tokens < 1:
                return True
            self._tokens -= 1

    async def run(self, metrics: Metrics) -> None:
        writer = asyncio.create_task(self._write())
        reader = asyncio.create_task(self._read())
        dropped = asyncio.create_task(self._dropped.wait())
        tasks = (writer, reader, dropped)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        chatty = (
            reader.done() and not reader.cancelled() and reader.exception() is None
            and reader.result()
        )
        if self._dropped.is_set():
            reason = "too slow"
        elif chatty:
            reason = "spectators do not send frames"
            metrics.feed_dropped_spectators.labels("chatty").inc()
        else:
            return  # the client left, or the socket failed
        self._closing = True
        if self.ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(1008, reason), CLOSE_TIMEOUT_S)


async def feed_endpoint(ws: WebSocket) -> None:
    services: Services = ws.app.state.services
    await ws.accept()
    encoding = ws.query_params.get("format", "json")
    if encoding not in ("json", "msgpack"):
        await ws.close(1008, "format must be json or msgpack")
        return
    spectator = Spectator(
        ws, "msgpack" if encoding == "msgpack" else "json",
        services.settings.feed_queue_batches,
    )
    gauge = services.metrics.sockets.labels("feed")
    gauge.inc()
    try:
        await services.feed.join(spectator)
        await spectator.run(services.metrics)
    finally:
        await services.feed.leave(spectator)
        gauge.dec()
