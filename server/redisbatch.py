"""One Redis pipeline per event-loop tick for every concurrent script call.

Hundreds of sockets settle bets at once; sending each EVALSHA in its own round trip costs a
syscall and a wake-up per bet on both sides. :class:`Batcher` queues calls made during one
tick of the loop and sends them together as one non-transactional pipeline; each caller
awaits only its own reply. Order is kept: calls are sent in the order they were made, so
two bets of one user queued in one tick run in that order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from plumbing import scripts
from plumbing.redisclient import Client
from plumbing.scripts import Script
from server.redisrouter import ClusterConnection
from server.resp import FastConnection

#: The bet path's connection: one Redis, or every master of a cluster.
BetConnection = FastConnection | ClusterConnection

Arg = str | bytes | int


class Batcher:
    """Batches script calls and sends them over ``fast``.

    ``client`` (redis-py) stays the general-purpose client of the process; the script calls
    go through :class:`server.resp.FastConnection` (or, on a cluster,
    :class:`server.redisrouter.ClusterConnection`), which also fills in the Redis run id
    (:data:`server.redisconn.RUN_ID`) at send time.
    """

    def __init__(self, client: Client, fast: BetConnection) -> None:
        self.client = client
        self.fast = fast
        self._queue: list[tuple[Script, Sequence[Arg], Sequence[Arg], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def load_scripts(self) -> None:
        """Load every script (a restarted Redis has none: the bet path meets them all).

        Through the bet path's own connection: on a cluster it sends SCRIPT LOAD to every
        master of its slot map, which a MOVED or a lost connection has made current, so
        the replica promoted by a failover (Redis does not replicate the script cache)
        gets them too, whatever the general client's map says.

        Raises:
            RedisError: a master refused a script or did not answer.
        """
        replies = await self.fast.execute(
            [("SCRIPT", "LOAD", script.source) for script in scripts.ALL]
        )
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> asyncio.Future[Any]:
        """Queue one EVALSHA; the future resolves to its reply or raises its error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((script, keys, args, future))
        return future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self, batch: list[tuple[Script, Sequence[Arg], Sequence[Arg], asyncio.Future[Any]]]
    ) -> None:
        async def load(_: object) -> None:
            await self.load_scripts()

        try:
            replies = await scripts.send_loading_once(self._pipeline, batch, load)
        except Exception as exc:  # RedisError, or a bug: every caller still gets an answer
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, RedisError):  # an error reply, or a command not sent
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _pipeline(
        self, batch: Sequence[tuple[Script, Sequence[Arg], Sequence[Arg], asyncio.Future[Any]]]
    ) -> list[Any]:
        return await self.fast.execute(
            [("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args, _ in batch]
        )
