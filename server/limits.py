"""Rate and concurrency limits kept in Redis, so they hold across every server instance.

Each limit is one call of ``lua/rate-1.lua`` (GCRA: a rate and a burst, one key per
subject) or ``lua/hold-1.lua`` (places held with an expiry: a user's open sockets). A limit
hit raises :class:`RateLimited` with the time after which a retry can pass, and nothing of
the request is done.

- Per client address (:meth:`Limits.check`): ``POST /api/demo``, sign-in attempts and the
  admin API. The address is the one uvicorn reports; behind a proxy, run uvicorn with
  ``--forwarded-allow-ips`` set to the proxy's address so that it is the client's.
- Per user, across all of the user's sockets (:class:`UserMeter`): messages and bets a
  second. Checking Redis before each frame would add a round trip to every bet, so the
  meter counts after the fact: the frames of each :data:`CHARGE_INTERVAL_S` are charged in
  one pipeline, and once Redis says a user is over, this instance refuses that user's
  frames until the retry time. A user can overshoot by what arrives within one interval
  and one Redis round trip (and by what the per-socket bucket of server/play.py lets
  through), never by more. Charging every loop tick instead cost a quarter of the bet
  path's throughput (a script call per user and rate per tick; docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from games.errors import RateLimited
from plumbing import scripts
from plumbing.keys import Keys
from plumbing.redisclient import Client

log = structlog.get_logger(__name__)

#: Seconds of usage the per-user meter gathers into one charge (one script call per user
#: and rate): the price of the meter on the bet path falls with it, the overshoot it allows
#: grows with it.
CHARGE_INTERVAL_S = 0.05

#: How long a socket's place among its user's sockets is held without renewal (ms); a
#: session renews it every third of that, so a crashed instance's places come free.
SOCKET_HOLD_MS = 60_000


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_s`` units a second, ``burst`` at once."""

    name: str
    per_s: float
    burst: int

    def args(self, cost: int, mode: str) -> tuple[str, str, str, str]:
        interval = max(1, round(1_000_000 / self.per_s))
        return str(interval), str(self.burst), str(cost), mode


class Limits:
    def __init__(self, redis: Client, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def check(self, rate: Rate, subject: str, what: str) -> None:
        """Take one unit of ``rate`` for ``subject``, or raise RateLimited (taking nothing)."""
        allowed, retry_ms = await scripts.run_one(
            self.redis, scripts.RATE, (self.keys.rate(rate.name, subject),),
            rate.args(1, "check"),
        )
        if not allowed:
            raise RateLimited(f"too many {what}; retry later", int(retry_ms) / 1000)

    async def charge(self, calls: Sequence[tuple[Rate, str, int]]) -> list[float]:
        """Take usage already served, ``(rate, subject, cost)`` each, in one pipeline;
        each answer is 0 or the seconds until that subject is within its rate again."""
        replies = await scripts.run(self.redis, [
            (scripts.RATE, (self.keys.rate(rate.name, subject),), rate.args(cost, "charge"))
            for rate, subject, cost in calls
        ])
        return [0.0 if allowed else int(ms) / 1000 for allowed, ms in replies]

    async def hold_socket(self, user_id: int, socket_id: str, places: int) -> None:
        """Take (or renew) one of the user's ``places`` sockets, or raise RateLimited."""
        held, count = await scripts.run_one(
            self.redis, scripts.HOLD, (self.keys.user_sockets(user_id),),
            (socket_id, str(SOCKET_HOLD_MS), str(places)),
        )
        if not held:
            raise RateLimited(f"this user already has {count} sockets open (at most {places})",
                              SOCKET_HOLD_MS / 1000)

    async def release_socket(self, user_id: int, socket_id: str) -> None:
        await self.redis.zrem(self.keys.user_sockets(user_id), socket_id)


class UserMeter:
    """Per-user rates across sockets and instances, charged every :data:`CHARGE_INTERVAL_S`
    (see the module docstring: the refusal follows Redis's answer by one round trip)."""

    def __init__(self, limits: Limits, rates: Sequence[Rate]) -> None:
        self._limits = limits
        self.rates = {rate.name: rate for rate in rates}
        #: (rate name, user id) -> loop time until which this instance refuses.
        self._blocked: dict[tuple[str, int], float] = {}
        self._pending: dict[tuple[str, int], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(CHARGE_INTERVAL_S, self._flush)

    def take(self, name: str, user_id: int) -> None:
        """Count one unit, or raise RateLimited while the user is known to be over."""
        key = (name, user_id)
        until = self._blocked.get(key)
        if until is not None:
            left = until - asyncio.get_running_loop().time()
            if left > 0:
                raise RateLimited(f"too many {name} for this user; slow down", left)
            del self._blocked[key]
        if not self._pending and not self._tasks:
            self._schedule()
        self._pending[key] = self._pending.get(key, 0) + 1

    def _flush(self) -> None:
        """Charge what is pending; one charge at a time, so a slow Redis gathers the usage
        of many ticks into the next call instead of opening connections for each."""
        pending, self._pending = self._pending, {}
        if pending:
            task = asyncio.create_task(self._charge(pending))
            self._tasks.add(task)
            task.add_done_callback(self._charged)

    def _charged(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._pending and not task.cancelled():
            self._schedule()

    async def _charge(self, pending: dict[tuple[str, int], int]) -> None:
        keys = list(pending)
        try:
            waits = await self._limits.charge(
                [(self.rates[name], str(uid), pending[(name, uid)]) for name, uid in keys]
            )
        except Exception as exc:  # the usage was served; Redis failing fails the bets anyway
            log.warning("user_rate_charge_failed", error=repr(exc))
            return
        now = asyncio.get_running_loop().time()
        for key, wait in zip(keys, waits, strict=True):
            if wait > 0:
                self._blocked[key] = now + wait
        if len(self._blocked) > 10_000:  # forget the ones long past
            self._blocked = {k: t for k, t in self._blocked.items() if t > now}

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def retry_after_header(exc: RateLimited) -> dict[str, str]:
    """HTTP's Retry-After for a limit hit: whole seconds, at least one."""
    return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}


def client_address(scope: Mapping[str, Any]) -> str:
    """The client's address as uvicorn reports it (the proxy's unless uvicorn was told to
    trust its X-Forwarded-For: --forwarded-allow-ips)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"
