"""The in-process persister: a task draining the outbox into PostgreSQL beside a game server.

The launcher runs it inside the game server's process (:mod:`stakepro.app` says when). It
and the Dramatiq workers can run at once: they are consumers of one group, and every write
is idempotent. All the work is :mod:`workers.outbox`; this is only the loop around it:
block on the streams, persist, back off on errors, take over what dead consumers left every
``reclaim_every_s``.

``close()`` never interrupts a batch: it asks the loop to stop, lets the batch in hand reach
COMMIT and its ack, then drains what is still in the streams (bets settled just before the
shutdown) for at most ``drain_timeout_s``. Only past that is the task cancelled; a batch cut
short is rolled back and not acknowledged, so it stays pending and is reclaimed later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import structlog

from plumbing.keys import Keys
from plumbing.redisclient import Client
from workers import commissions, outbox

log = structlog.get_logger(__name__)


class Persister:
    def __init__(
        self,
        redis: Client,
        pool: asyncpg.Pool,
        keys: Keys,
        consumer: str,
        *,
        count: int = 1000,
        block_ms: int = 100,
        reclaim_every_s: float = 10.0,
        drain_timeout_s: float = 5.0,
        commission_flush_s: float | None = 2.0,
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._keys = keys
        self.consumer = consumer
        self._count = count
        self._block_ms = block_ms
        self._reclaim_every_s = reclaim_every_s
        self._drain_timeout_s = drain_timeout_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Entries persisted by this process (for tests and metrics).
        self.handled = 0
        #: The commission flush loop (workers/commissions.py), None to leave it to workers.
        self.commissions = (
            commissions.Flusher(redis, pool, keys, commission_flush_s, consumer)
            if commission_flush_s else None
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outbox-persister")
            if self.commissions is not None:
                self.commissions.start()

    async def close(self) -> None:
        """Stop after the batch in hand, flush what is left, within ``drain_timeout_s``."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), self._drain_timeout_s + 1.0)
        except TimeoutError:
            log.warning("persister_close_timeout", consumer=self.consumer)
            task.cancel()
            # Bounded: redis-py can swallow a cancellation raised inside a command.
            await asyncio.wait({task}, timeout=2.0)
        except Exception:
            log.exception("persister_failed", consumer=self.consumer)
        if self.commissions is not None:
            await self.commissions.close()  # after the last batch: pays what it stored

    async def _run(self) -> None:
        failures = 0
        recover = True  # at start, and after a failure: our own pending entries first
        next_reclaim = 0.0
        while not self._stop.is_set():
            try:
                if recover:
                    await outbox.ensure_groups(self._redis, self._keys)
                    await self._drain_pending()
                    recover = False
                if time.monotonic() >= next_reclaim:
                    self.handled += await outbox.reclaim(
                        self._redis, self._pool, self._keys, self.consumer, self._count
                    )
                    next_reclaim = time.monotonic() + self._reclaim_every_s
                self.handled += await outbox.drain_once(
                    self._redis, self._pool, self._keys, self.consumer, self._count,
                    self._block_ms,
                )
                failures = 0
            except Exception as exc:
                failures += 1
                recover = True
                delay = outbox.backoff(failures)
                log.error("persister_error", consumer=self.consumer, error=repr(exc),
                          failures=failures, retry_in_s=delay, exc_info=failures == 1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        await self._flush()

    async def _drain_pending(self) -> None:
        while n := await outbox.drain_once(
            self._redis, self._pool, self._keys, self.consumer, self._count, pending=True
        ):
            self.handled += n

    async def _flush(self) -> None:
        """On close: persist our pending entries and what is in the streams, non-blocking."""
        deadline = time.monotonic() + self._drain_timeout_s
        try:
            await self._drain_pending()
            while time.monotonic() < deadline:
                n = await outbox.drain_once(
                    self._redis, self._pool, self._keys, self.consumer, self._count, block_ms=0
                )
                self.handled += n
                if n == 0:
                    break
        except Exception as exc:
            # Left pending or unread: a live consumer reclaims it (nothing was acked).
            log.error("persister_flush_failed", consumer=self.consumer, error=repr(exc))
