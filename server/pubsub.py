"""Sharded pub/sub of one process, shared by balance pushes and the feed.

Channels are subscribed while some local consumer wants them; messages are dispatched to
the handler registered for their channel. Every channel is a shard channel (SSUBSCRIBE;
the scripts and the feed SPUBLISH), on one Redis and on a cluster alike (docs/decisions.md,
section 7): on a cluster a message travels only to the nodes serving its channel's slot,
and PUBSUB SHARDNUMSUB, which bet-n.lua asks before it pushes, counts every subscriber.

On one Redis this is one connection (redis-py's PubSub, re-subscribed after a reconnect);
on a cluster, redis-py's ClusterPubSub holds one connection per master with subscribed
channels, and moves a channel to its slot's new master when its own slot map changes.

Every channel must be subscribed on its slot's master: a subscriber on a replica still
receives (SPUBLISH reaches the whole shard), but PUBSUB SHARDNUMSUB, which bet-n asks the
master, does not count it, so pushes meant for it are skipped. Two ways a channel leaves
its master, neither of which makes redis-py read the slot map again, are repaired here
(the map is read again, then the channels are subscribed again, on the masters it names):

- a master that stops serving a slot (demoted by a failover, or the slot migrated away)
  drops its subscribers with a ``sunsubscribe`` of its own;
- a killed master that comes back as a replica at the same address before redis-py has
  moved the channels away gets them again when redis-py reconnects and subscribes again.
  A watch asks every node holding this hub's channels for its ROLE every
  :data:`WATCH_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from redis.asyncio.cluster import ClusterPubSub, RedisCluster
from redis.exceptions import RedisError

from games.errors import Unavailable
from plumbing.redisclient import Client

log = structlog.get_logger(__name__)

Handler = Callable[[bytes], None]

#: Tries of one SUBSCRIBE (0.1 s, 0.2 s, ... apart) before a sign-in answers UNAVAILABLE.
SUBSCRIBE_ATTEMPTS = 6


#: Longest pause between two tries to subscribe again to channels Redis dropped.
RESUBSCRIBE_MAX_DELAY_S = 2.0
#: Seconds between two checks, on a cluster, that every node holding channels of this hub
#: is a master.
WATCH_S = 1.0


class Hub:
    def __init__(self, client: Client, heartbeat_channel: str) -> None:
        self._client = client
        self._pubsub = client.pubsub()
        self._handlers: dict[str, Handler] = {}
        self._heartbeat = heartbeat_channel
        self._task: asyncio.Task[None] | None = None
        #: Channels Redis dropped that are still wanted, and the task subscribing them again.
        self._dropped: set[str] = set()
        self._repair: asyncio.Task[None] | None = None
        #: Channels this hub unsubscribed whose sunsubscribe has not been read yet (a count:
        #: a channel can be left, wanted and left again meanwhile).
        self._leaving: dict[str, int] = {}
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Always subscribed to one channel, so the reader never spins on an idle connection.
        await self._pubsub.ssubscribe(self._heartbeat)
        self._task = asyncio.create_task(self._read(), name="pubsub-reader")
        if isinstance(self._client, RedisCluster):
            self._watch = asyncio.create_task(self._watch_roles(), name="pubsub-watch")

    async def close(self) -> None:
        for task in (self._task, self._watch, self._repair):
            if task is not None:
                task.cancel()
                # Bounded: redis-py can swallow a cancellation raised inside a command.
                await asyncio.wait({task}, timeout=2.0)
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
            self._leaving[channel] = self._leaving.get(channel, 0) + 1
            try:
                await self._pubsub.sunsubscribe(channel)
            except Exception as exc:
                log.warning("pubsub_unsubscribe_failed", error=repr(exc))
                # No confirmation will come for it.
                left = self._leaving.pop(channel, 1) - 1
                if left:
                    self._leaving[channel] = left

    async def _read(self) -> None:
        while True:
            try:
                # One Redis: get_message itself; a cluster: every master's connection.
                message = await self._pubsub.get_sharded_message(
                    ignore_subscribe_messages=False, timeout=1.0
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the reader must outlive any failure of the connection
                log.warning("pubsub_read_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            channel = message["channel"]
            name = channel.decode() if isinstance(channel, bytes) else channel
            if message["type"] == "sunsubscribe":
                left = self._leaving.pop(name, 0)
                if left > 1:
                    self._leaving[name] = left - 1
                # Not ours: Redis dropped the channel (see above).
                if not left and (name in self._handlers or name == self._heartbeat):
                    self._resubscribe(name)
                continue
            if message["type"] != "smessage":
                continue
            handler = self._handlers.get(name)
            if handler is not None:
                try:
                    handler(message["data"])
                except Exception:
                    log.exception("pubsub_handler_failed", channel=channel)

    def _resubscribe(self, channel: str) -> None:
        """Subscribe again to ``channel``, dropped by Redis (one task for every channel
        dropped by the same change)."""
        self._dropped.add(channel)
        if self._repair is None or self._repair.done():
            self._repair = asyncio.create_task(self._subscribe_dropped(), name="pubsub-repair")

    async def _subscribe_dropped(self) -> None:
        delay = 0.05
        while self._dropped:
            # The pause lets the other channels of the same node's change arrive first.
            await asyncio.sleep(delay)
            try:
                if isinstance(self._client, RedisCluster):
                    await self._client.nodes_manager.initialize()
                again = 0
                for channel in sorted(self._dropped):
                    if channel in self._handlers or channel == self._heartbeat:
                        await self._pubsub.ssubscribe(channel)
                        again += 1
                    self._dropped.discard(channel)
                log.warning("pubsub_resubscribed", channels=again)
            except Exception as exc:  # Redis still failing over: try again, for as long
                log.warning("pubsub_resubscribe_failed", error=repr(exc))
                delay = min(delay * 2, RESUBSCRIBE_MAX_DELAY_S)

    async def _watch_roles(self) -> None:
        """Every :data:`WATCH_S`: any node holding channels of this hub that is not a master
        (a killed master back as a replica) has them all subscribed again."""
        assert isinstance(self._client, RedisCluster)
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                if await self._on_a_replica(self._client):
                    log.warning("pubsub_channels_on_a_replica")
                    for channel in (*self._handlers, self._heartbeat):
                        self._resubscribe(channel)
            except Exception as exc:  # a node down: redis-py's own repair moves its channels
                log.warning("pubsub_watch_failed", error=repr(exc))

    async def _on_a_replica(self, client: RedisCluster) -> bool:
        pubsub = self._pubsub
        assert isinstance(pubsub, ClusterPubSub)
        # ClusterPubSub keeps one PubSub per node holding channels, by node name.
        for name in list(pubsub.node_pubsub_mapping):
            node = client.get_node(node_name=name)
            if node is None:
                return True
            role = await client.execute_command("ROLE", target_nodes=node)
            if _text(role[0]) != "master":
                return True
        return False


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
