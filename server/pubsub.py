"""Sharded pub/sub of one process, shared by balance pushes and the feed.

Channels are subscribed while some local consumer wants them; messages are dispatched to
the handler registered for their channel. Every channel is a shard channel (SSUBSCRIBE;
the scripts and the feed SPUBLISH), on one Redis and on a cluster alike (docs/decisions.md,
section 7): on a cluster a message travels only to the nodes serving its channel's slot,
and PUBSUB SHARDNUMSUB, which bet-n.lua asks before it pushes, counts every subscriber.

On one Redis this is one connection (redis-py's PubSub, re-subscribed after a reconnect);
on a cluster, redis-py's ClusterPubSub holds one connection per master with subscribed
channels, and moves a channel to its slot's new master after a failover or a migration.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from redis.exceptions import RedisError

from games.errors import Unavailable
from plumbing.redisclient import Client

log = structlog.get_logger(__name__)

Handler = Callable[[bytes], None]

#: Tries of one SUBSCRIBE (0.1 s, 0.2 s, ... apart) before a sign-in answers UNAVAILABLE.
SUBSCRIBE_ATTEMPTS = 6


class Hub:
    def __init__(self, client: Client, heartbeat_channel: str) -> None:
        self._pubsub = client.pubsub()
        self._handlers: dict[str, Handler] = {}
        self._heartbeat = heartbeat_channel
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Always subscribed to one channel, so the reader never spins on an idle connection.
        await self._pubsub.ssubscribe(self._heartbeat)
        self._task = asyncio.create_task(self._read(), name="pubsub-reader")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: redis-py can swallow a cancellation raised inside a command.
            await asyncio.wait({self._task}, timeout=2.0)
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()

    async def subscribe(self, channel: str, handler: Handler) -> None:
        """Subscribe, retrying through a reconnect (a restarted Redis); raises Unavailable
        when Redis stays unreachable."""
        self._handlers[channel] = handler
        for attempt in range(SUBSCRIBE_ATTEMPTS):
            try:
                await self._pubsub.ssubscribe(channel)
                return
            except Exception as exc:  # redis-py can fail oddly mid-reconnect, not only RedisError
                log.warning("pubsub_subscribe_failed", error=repr(exc), attempt=attempt)
                await asyncio.sleep(0.1 * 2**attempt)
        self._handlers.pop(channel, None)
        raise Unavailable("live updates are unavailable (Redis pub/sub); try again")

    async def unsubscribe(self, channel: str) -> None:
        """Best effort: a channel left subscribed only costs messages nobody handles."""
        if self._handlers.pop(channel, None) is not None:
            try:
                await self._pubsub.sunsubscribe(channel)
            except Exception as exc:
                log.warning("pubsub_unsubscribe_failed", error=repr(exc))

    async def _read(self) -> None:
        while True:
            try:
                # One Redis: get_message itself; a cluster: every master's connection.
                message = await self._pubsub.get_sharded_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the reader must outlive any failure of the connection
                log.warning("pubsub_read_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            if message is None or message["type"] != "smessage":
                continue
            channel = message["channel"]
            name = channel.decode() if isinstance(channel, bytes) else channel
            handler = self._handlers.get(name)
            if handler is not None:
                try:
                    handler(message["data"])
                except Exception:
                    log.exception("pubsub_handler_failed", channel=channel)
