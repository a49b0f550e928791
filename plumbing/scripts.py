"""The Lua scripts of lua/, loaded once, and the one way to run them on redis-py.

Scripts are read from disk at import, identified by their SHA-1 and run with EVALSHA; a
NOSCRIPT reply (a restarted or failed-over Redis) loads them again and retries once. That
retry is safe: NOSCRIPT means the script did not run. Their reply codes are
:mod:`games.codes`.

:func:`run` is that EVALSHA-and-retry for the redis-py clients (the workers, the lease);
the bet path sends its calls over its own connection (:class:`server.redisbatch.Batcher`)
and loads :data:`ALL` the same way when it meets NOSCRIPT.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

LUA_DIR = Path(__file__).resolve().parent.parent / "lua"


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, filename: str) -> Script:
        source = (LUA_DIR / filename).read_text()
        return cls(filename, source, hashlib.sha1(source.encode()).hexdigest())


BET = Script.load("bet-n.lua")
DEPOSIT = Script.load("deposit-5.lua")
ROTATE = Script.load("rotate-3.lua")
HEAL = Script.load("heal-n.lua")
OUTBOX_ACK_ACCRUE = Script.load("outbox-ack-accrue-n.lua")
COMMISSION_TAKE = Script.load("commission-take-3.lua")
COMMISSION_CREDIT = Script.load("commission-credit-n.lua")
LEASE = Script.load("lease-1.lua")
ALL = (BET, DEPOSIT, ROTATE, OUTBOX_ACK_ACCRUE, COMMISSION_TAKE, COMMISSION_CREDIT, LEASE,
       HEAL)

#: One script call: the script, its KEYS, its ARGV.
Call = tuple[Script, Sequence[str], Sequence[Any]]


async def run(redis: aioredis.Redis, calls: Sequence[Call]) -> list[Any]:
    """EVALSHA every call in one pipeline; load and retry the NOSCRIPT ones once.

    Raises the first other error (after every call ran: each caller's calls are
    idempotent or report what they did in their reply).
    """
    if not calls:
        return []

    async def send(batch: Sequence[Call]) -> list[Any]:
        pipe = redis.pipeline(transaction=False)
        for script, keys, args in batch:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    replies = await send(calls)
    again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
    if again:
        for script in {calls[i][0] for i in again}:
            await redis.script_load(script.source)
        for i, reply in zip(again, await send([calls[i] for i in again]), strict=True):
            replies[i] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


async def run_one(redis: aioredis.Redis, script: Script, keys: Sequence[str],
                  args: Sequence[Any]) -> Any:
    """:func:`run` for a single call: its reply."""
    return (await run(redis, [(script, keys, args)]))[0]
