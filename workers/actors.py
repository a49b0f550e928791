"""The Dramatiq actors: persist the outbox, flush the commissions.

Run them with ``dramatiq workers.actors`` (``make run`` does); the scheduler
(:mod:`workers.scheduler`) enqueues them periodically. Both are safe to run any number of
times at once, by any number of processes: duplicated messages, a second scheduler, a
Dramatiq retry or a message redelivered after a worker died never write a row twice or pay a
commission twice (every write is idempotent, see workers/outbox.py and
workers/commissions.py); the leases only keep the work from being done twice for nothing.

``persist_outbox(shard)``
    Shard ``s`` of ``settings.persist_shards`` (``n``) owns the bucket streams ``b`` with
    ``b % n == s``. The job takes the shard's lease (plumbing/lease.py, renewed while it
    works), and while it holds it, for ``settings.persist_run_s``: first the shard
    consumer's own pending entries (a previous holder died or failed between COMMIT and
    XACK: they are written again, idempotently, and acknowledged), then entries idle on any
    other consumer for 30 s (XAUTOCLAIM: a consumer name of another shard count, or the
    in-process persister of a server that died), then new entries, batch after batch
    (workers.outbox.drain_once). Without the lease it asks again every 50 ms for up to
    ``persist_every_s`` (the next job is then already waiting when the holder releases),
    then returns: another job drains the shard.

    The consumer name is the shard's (``persist-<s>/<n>``), not the process's: the lease
    makes its holder the shard's only reader, so the next holder finds a dead holder's
    entries in its own pending list at once instead of waiting for them to go idle.

``flush_commissions()``
    :func:`workers.commissions.flush_window`: pays what is due, at most one PostgreSQL
    statement per ``settings.commission_flush_s`` window across every process (that module's
    lease), exactly once whatever crashes (each bet records the flush that paid it in
    PostgreSQL; the lease only saves work).

Each worker process keeps one Redis client (:func:`plumbing.redisclient.open_client`: a
cluster client when ``REDIS_URL`` names a cluster node) and one asyncpg pool, created on first
use in the event loop of Dramatiq's AsyncIO middleware. When the worker shuts down the jobs
in hand stop after their batch, the commissions due so far are flushed once more, and
the clients are closed (workers.broker.Lifecycle hooks).
"""

from __future__ import annotations

# The broker first: every actor below binds to the global broker it sets.
from workers.broker import QUEUE, SETTINGS, lifecycle  # isort: skip

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import dramatiq
import structlog
from dramatiq.asyncio import get_event_loop_thread

from plumbing.keys import Keys
from plumbing.lease import RENEW_EVERY_S, Lease
from plumbing.redisclient import Client, open_client
from plumbing.settings import Settings
from workers import outbox

if TYPE_CHECKING:
    from workers.commissions import FlushReport

log = structlog.get_logger(__name__)

#: How often a persist job that found its shard's lease taken asks again (see persist()).
LEASE_POLL_S = 0.05
#: A persist lease lives this long unless renewed; a dead holder blocks its shard this long.
LEASE_MS = 3000
#: Entries per stream per batch (one batch is at most BATCH x buckets-of-the-shard entries).
BATCH = 500
#: A batch smaller than this is followed by a pause, so that batches come at most every
#: BATCH_EVERY_S: at a steady rate the per-batch costs (one XREADGROUP over every stream of
#: the shard, one ack script per stream, a PostgreSQL transaction) are paid ~10 times a second
#: instead of once per handful of bets. Adds at most BATCH_EVERY_S to the persistence lag.
FULL_BATCH = 2000
BATCH_EVERY_S = 0.1
#: Seconds a persist job may overrun its run before it is cancelled (see persist_outbox).
OVERRUN_S = 15.0
#: Seconds the final flush at worker shutdown may take.
FINAL_FLUSH_S = 5.0


@dataclass(frozen=True, slots=True)
class ShardKeys(Keys):
    """The keys, with ``all_outboxes`` narrowed to the buckets of one shard."""

    shard: int = 0
    shards: int = 1

    def all_outboxes(self) -> list[str]:
        return [self.outbox(b) for b in range(self.shard, self.buckets, self.shards)]


def consumer_name(shard: int, shards: int) -> str:
    return f"persist-{shard}/{shards}"


@dataclass
class Resources:
    """One per worker process: the clients every job of the process shares."""

    settings: Settings
    redis: Client
    pool: asyncpg.Pool
    keys: Keys
    #: Shards whose consumer groups this process has made sure of.
    groups: set[int] = field(default_factory=set)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


_resources: Resources | None = None
_opening: asyncio.Lock | None = None
#: Set when the worker begins to shut down: jobs stop after the batch in hand.
_stopping = False


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a connection without asyncpg's reset query (RESET ALL, UNLISTEN *, CLOSE ALL,
    advisory unlock): the workers keep no session state but the outbox's staging table
    (kept on purpose), and only SET LOCAL, so that round trip per batch bought nothing. An
    open transaction is still rolled back by the pool before this is called."""


async def open_pool(settings: Settings) -> asyncpg.Pool:
    """The worker process's PostgreSQL pool."""
    return await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4,
                                     reset=_keep_session)


async def resources(settings: Settings = SETTINGS) -> Resources:
    """This process's clients, created on first use in the running event loop."""
    global _resources, _opening
    if _resources is not None:
        return _resources
    if _opening is None:
        _opening = asyncio.Lock()
    async with _opening:
        if _resources is None:
            redis = await open_client(settings.redis_url)
            pool = await open_pool(settings)
            _resources = Resources(settings, redis, pool,
                                   Keys(settings.key_prefix, settings.buckets))
    return _resources


async def close_resources(final_flush: bool = True) -> None:
    """Flush the commissions of this process's last batches once more, then close."""
    global _resources
    res, _resources = _resources, None
    if res is None:
        return
    if final_flush:
        try:
            from workers import commissions

            await asyncio.wait_for(commissions.flush(res.redis, res.pool, res.keys),
                                   FINAL_FLUSH_S)
        except Exception as exc:  # left in Redis: the next flush anywhere pays it
            log.error("final_flush_failed", error=repr(exc))
    await res.pool.close()
    await res.redis.aclose()


def _on_stopping() -> None:
    global _stopping
    _stopping = True


def _on_stopped() -> None:
    thread = get_event_loop_thread()
    if thread is not None and _resources is not None:
        try:
            thread.run_coroutine(close_resources())
        except Exception as exc:
            log.error("close_failed", error=repr(exc))


lifecycle.on_stopping.append(_on_stopping)
lifecycle.on_stopped.append(_on_stopped)


# -- the work, as plain coroutines (the actors below, and tests, call them) -----------------


async def persist(res: Resources, shard: int, run_s: float, batch: int = BATCH) -> int:
    """Drain shard ``shard`` for ``run_s`` seconds if its lease is free; entries handled."""
    shards = res.settings.persist_shards
    if not 0 <= shard < shards:
        log.error("persist_bad_shard", shard=shard, shards=shards)
        return 0
    keys = ShardKeys(res.keys.prefix, res.keys.buckets, shard, shards)
    lease = Lease(res.redis, keys.persist_lease(shard, shards), LEASE_MS)
    # The scheduler enqueues a job per shard every persist_every_s; while one drains, the
    # next waits up to that long for the lease, so it takes over within LEASE_POLL_S of
    # the release instead of at the next tick plus Dramatiq's dispatch (a gap that shows as
    # persistence lag under load: docs/benchmarks.md).
    waited_until = time.monotonic() + res.settings.persist_every_s
    while not await lease.acquire():
        if time.monotonic() >= waited_until or _stopping:
            return 0
        await asyncio.sleep(LEASE_POLL_S)
    keeper = asyncio.create_task(lease.keep(), name=f"lease-{shard}")
    consumer = consumer_name(shard, shards)
    handled = 0
    try:
        if shard not in res.groups:
            await outbox.ensure_groups(res.redis, keys)
            res.groups.add(shard)
        # What a previous holder read and did not acknowledge (it died, or failed after
        # COMMIT): written again, idempotently, then acknowledged.
        while n := await outbox.drain_once(res.redis, res.pool, keys, consumer, batch,
                                           pending=True):
            handled += n
        handled += await outbox.reclaim(res.redis, res.pool, keys, consumer, batch)
        deadline = time.monotonic() + run_s
        while lease.held and not _stopping:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            started = time.monotonic()
            n = await outbox.drain_once(res.redis, res.pool, keys, consumer, batch,
                                        block_ms=min(200, max(1, left_ms)))
            handled += n
            if 0 < n < FULL_BATCH:
                pause = min(BATCH_EVERY_S - (time.monotonic() - started),
                            deadline - time.monotonic())
                if pause > 0:
                    await asyncio.sleep(pause)
        return handled
    except BaseException:
        res.groups.discard(shard)  # e.g. NOGROUP after a Redis restart: check them again
        raise
    finally:
        # Found with the persist_overrun log: awaiting the cancelled keeper could hang for
        # good when the cancellation landed inside a redis-py command that swallowed it
        # (the loop then went on renewing). So the keeper is told to stop as well, and is
        # given a bounded wait.
        lease.stop_keeping()
        keeper.cancel()
        await asyncio.wait({keeper}, timeout=2 * RENEW_EVERY_S)
        with contextlib.suppress(Exception):
            await lease.release()
        if handled:
            log.info("persisted", shard=shard, entries=handled)


async def flush(res: Resources) -> FlushReport | None:
    """One commission flush if this window's lease is free (workers.commissions)."""
    from workers import commissions

    return await commissions.flush_window(res.redis, res.pool, res.keys,
                                          res.settings.commission_flush_s, res.token)


# -- the actors ------------------------------------------------------------------------------

_OPTIONS: dict[str, Any] = {
    "queue_name": QUEUE,
    # Dramatiq's retry path: a failed job comes back soon; anything it left half done is
    # completed idempotently by the retry (or by the next scheduled job, whichever is first).
    "max_retries": 5,
    "min_backoff": 100,
    "max_backoff": 2000,
    # Scheduler ticks older than this are dropped (the next tick does the same work).
    "max_age": 30_000,
}


@dramatiq.actor(**_OPTIONS, time_limit=int((SETTINGS.persist_run_s + 60) * 1000))
async def persist_outbox(shard: int = 0) -> None:
    # A job has been seen to stall under load (2 of ~9 sustained 2,000 bets/s runs; cause
    # not found yet): it then held the shard until Dramatiq's time limit (run_s + 60 s). The
    # job is now cancelled OVERRUN_S after its run should have ended, so the next one takes
    # the shard at once; shortly before, the stack it is stuck in is logged as
    # "persist_overrun" for whoever finds the cause. Cancelling is safe: nothing is acked
    # before COMMIT, and what was committed but not acked is written again idempotently.
    job = asyncio.current_task()
    watchdog = asyncio.create_task(_report_overrun(job, SETTINGS.persist_run_s + OVERRUN_S / 2))
    try:
        async with asyncio.timeout(SETTINGS.persist_run_s + OVERRUN_S):
            await persist(await resources(), shard, SETTINGS.persist_run_s)
    except TimeoutError:
        log.error("persist_cancelled", shard=shard, after_s=SETTINGS.persist_run_s + OVERRUN_S)
    finally:
        watchdog.cancel()


async def _report_overrun(job: asyncio.Task[Any] | None, after_s: float) -> None:
    await asyncio.sleep(after_s)
    if job is None:
        return
    # Task.get_stack() shows one frame of a suspended task: walk the await chain instead.
    chain: list[str] = []
    awaited: Any = job.get_coro()
    while awaited is not None and len(chain) < 60:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            chain.append(repr(awaited)[:200])  # a future or a C awaitable: the end
            break
        chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    log.error("persist_overrun", after_s=after_s, awaiting=chain)


@dramatiq.actor(**_OPTIONS, time_limit=60_000)
async def flush_commissions() -> None:
    report = await flush(await resources())
    if report is not None and (report.bets or report.plans):
        log.info("flushed", bets=report.bets, plans=report.plans, paid=report.paid)
