"""The Redis client, and the run id of the Redis server it talks to.

Redis gives a new ``run_id`` to every start. bet-5.lua compares the run id stored with the
user's seed pair against the one the server passes in: a pair installed before a restart
(which may have lost the last writes, and so may hand out a nonce whose roll a player has
already seen) is rotated before its next bet. The run id is read on every new connection,
before any command runs on it, so a command never reaches a restarted Redis with the run id
of the previous one.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection


class RunId:
    def __init__(self) -> None:
        self.value = ""

    async def on_connect(self, conn: Connection) -> None:
        await conn.on_connect()
        await conn.send_command("INFO", "server")
        info = await conn.read_response()
        text = info.decode() if isinstance(info, bytes) else str(info)
        for line in text.splitlines():
            if line.startswith("run_id:"):
                self.value = line[len("run_id:"):].strip()
                return


def connect(url: str) -> tuple[aioredis.Redis, RunId]:
    run_id = RunId()
    client = aioredis.Redis.from_url(url, redis_connect_func=run_id.on_connect)
    return client, run_id
