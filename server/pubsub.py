"""One Redis pub/sub connection per process, shared by balance pushes and the feed.

Channels are subscribed while some local consumer wants them; messages are dispatched to
the handler registered for their channel. redis-py re-subscribes after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

Handler = Callable[[bytes], None]


class Hub:
    def __init__(self, client: aioredis.Redis, heartbeat_channel: str) -> None:
        self._pubsub = client.pubsub()
        self._handlers: dict[str, Handler] = {}
        self._heartbeat = heartbeat_channel
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Always subscribed to one channel, so the reader never spins on an idle connection.
        await self._pubsub.subscribe(self._heartbeat)
        self._task = asyncio.create_task(self._read(), name="pubsub-reader")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def subscribe(self, channel: str, handler: Handler) -> None:
        self._handlers[channel] = handler
        await self._pubsub.subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        if self._handlers.pop(channel, None) is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
            except (RedisError, OSError) as exc:
                log.warning("pubsub_read_failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            if message is None or message["type"] != "message":
                continue
            channel = message["channel"]
            name = channel.decode() if isinstance(channel, bytes) else channel
            handler = self._handlers.get(name)
            if handler is not None:
                try:
                    handler(message["data"])
                except Exception:
                    log.exception("pubsub_handler_failed", channel=channel)
