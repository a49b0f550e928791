"""The Lua scripts of lua/, loaded once, and the one way to run them on redis-py.

Scripts are read from disk at import, identified by their SHA-1 and run with EVALSHA; a
NOSCRIPT reply (a restarted or failed-over Redis) loads them again and retries once. That
retry is safe: NOSCRIPT means the script did not run. Their reply codes are
:mod:`games.codes`.

:func:`needs_load` is that rule, and :func:`send_loading_once` applies it to any way of
sending: :func:`run` for the redis-py clients (the workers, the lease), and
:class:`server.redisbatch.Batcher` for the calls of the game server, which go over a
connection of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from redis.exceptions import NoScriptError

from plumbing.redisclient import Client

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
OUTBOX_ACK = Script.load("outbox-ack-n.lua")
COMMISSION_CREDIT = Script.load("commission-credit-n.lua")
LEASE = Script.load("lease-1.lua")
RATE = Script.load("rate-1.lua")
HOLD = Script.load("hold-1.lua")
RUN_ID = Script.load("runid-1.lua")
ALL = (BET, DEPOSIT, ROTATE, HEAL, OUTBOX_ACK, COMMISSION_CREDIT, LEASE, RATE, HOLD, RUN_ID)

#: One script call: the script, its KEYS, its ARGV.
Call = tuple[Script, Sequence[str], Sequence[Any]]

C = TypeVar("C")


def needs_load(reply: Any) -> bool:
    """Whether a call that got ``reply`` is sent again, once, after loading the scripts:
    only when Redis answered NOSCRIPT. That means the script did not run, so the resend
    cannot apply it twice; every other reply, error or not, stands."""
    return isinstance(reply, NoScriptError)


def to_resend(replies: Sequence[Any]) -> list[int]:
    """The positions of the calls :func:`needs_load` sends again."""
    return [i for i, reply in enumerate(replies) if needs_load(reply)]


async def send_loading_once(
    send: Callable[[Sequence[C]], Awaitable[list[Any]]],
    calls: Sequence[C],
    load: Callable[[Sequence[C]], Awaitable[None]],
) -> list[Any]:
    """The replies of ``calls`` (in order) sent with ``send``: the ones :func:`to_resend`
    names are sent again after one ``load`` of the scripts (given the calls to resend)."""
    replies = await send(calls)
    again = to_resend(replies)
    if again:
        resend = [calls[i] for i in again]
        await load(resend)
        for i, reply in zip(again, await send(resend), strict=True):
            replies[i] = reply
    return replies


async def load(redis: Client, which: Iterable[Script] = ALL) -> None:
    """SCRIPT LOAD each of ``which``."""
    for script in which:
        await redis.script_load(script.source)


async def run(redis: Client, calls: Sequence[Call]) -> list[Any]:
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

    async def load_missing(again: Sequence[Call]) -> None:
        await load(redis, {script for script, _, _ in again})

    replies = await send_loading_once(send, calls, load_missing)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


async def run_one(redis: Client, script: Script, keys: Sequence[str],
                  args: Sequence[Any]) -> Any:
    """:func:`run` for a single call: its reply."""
    return (await run(redis, [(script, keys, args)]))[0]
