"""A Redis lease: SET NX PX with a token of its own, renewed and released only while ours.

The two exclusions of the workers use it: the persist shard's lease (workers/actors.py,
renewed while a job drains the shard) and the commission flush window's lease
(workers/commissions.py, taken once per window and left to expire). Neither guards money:
every write under them is idempotent, they only keep work from being done twice for
nothing. Renew and release are lua/lease-1.lua (compare, then PEXPIRE or DEL), so a holder
whose lease expired never extends or deletes its successor's.
"""

from __future__ import annotations

import asyncio
import uuid

import structlog

from plumbing import scripts
from plumbing.redisclient import Client

log = structlog.get_logger(__name__)

#: Seconds between two renewals of a kept lease (:meth:`Lease.keep`).
RENEW_EVERY_S = 1.0


class Lease:
    """One holder's claim on ``key``, ``ttl_ms`` at a time."""

    def __init__(self, redis: Client, key: str, ttl_ms: int,
                 token: str | None = None) -> None:
        self._redis = redis
        self.key = key
        self._ttl_ms = max(1, ttl_ms)
        self._token = token or uuid.uuid4().hex
        self.held = False
        self._keeping = False

    async def acquire(self) -> bool:
        self.held = bool(await self._redis.set(self.key, self._token, nx=True, px=self._ttl_ms))
        return self.held

    async def renew(self) -> bool:
        if self.held:
            self.held = bool(await scripts.run_one(
                self._redis, scripts.LEASE, [self.key], ["renew", self._token, self._ttl_ms]))
        return self.held

    async def release(self) -> None:
        if self.held:
            self.held = False
            await scripts.run_one(self._redis, scripts.LEASE, [self.key],
                                  ["release", self._token, 0])

    def stop_keeping(self) -> None:
        """End :meth:`keep` at its next step even if a cancellation is swallowed below it
        (redis-py can absorb a CancelledError raised mid-command)."""
        self._keeping = False

    async def keep(self, every_s: float = RENEW_EVERY_S) -> None:
        """Renew until lost, stopped or cancelled (a task beside the work it guards)."""
        self._keeping = True
        while self.held and self._keeping:
            await asyncio.sleep(every_s)
            try:
                if not await self.renew():
                    log.warning("lease_lost", key=self.key)
            except Exception as exc:  # cannot tell: stop working under it
                log.error("lease_renew_failed", key=self.key, error=repr(exc))
                self.held = False
