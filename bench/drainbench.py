"""Drain benchmark: the worker's CPU per persisted bet, on a frozen outbox, repeatably.

Fill the outbox once with real events while no worker runs (the game server alone, with
``INPROCESS_PERSISTER=false``, and ``python -m loadtest storm --sustained ...`` or
``bets``), then::

    python -m bench.drainbench snapshot        # COPY every outbox stream aside, once
    python -m bench.drainbench run --runs 3    # per run: restore, reset, drain, measure

A run restores the streams from the snapshot (consumer groups gone: a first drain), empties
what the drain writes (``bets``, ``ledger``, ``commission_flushes``, ``commission_totals``
and the commission keys in Redis; users and seed pairs stay, so the agent chains are real),
then calls :func:`workers.actors.persist` (what the ``persist_outbox`` actor runs: lease,
lease keeper, pending re-read, XAUTOCLAIM, batches) in this process until the streams are
empty, then one commission flush. It reports, per 1,000 persisted entries, the CPU of this
process (``time.process_time``: the worker's own work) and of Redis (``INFO cpu``), and the
drain rate. CPU is measured up to the last batch handled, not over the idle tail.

Destructive: run it only against a Redis and a database of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from plumbing.keys import Keys
from plumbing.logs import configure_logging
from plumbing.settings import Settings
from workers import actors, commissions, outbox

SUFFIX = ":drainbench"


# Every ancestor's paid total against floor(amount * bps / 10000) summed over the bets.
_EXACT_SQL = """
WITH RECURSIVE up AS (
    SELECT u.user_id AS player, p.user_id AS ancestor, p.parent_id, p.commission_bps,
           0 AS depth
    FROM users u JOIN users p ON p.user_id = u.parent_id
    UNION ALL
    SELECT up.player, p.user_id, p.parent_id, p.commission_bps, up.depth + 1
    FROM up JOIN users p ON p.user_id = up.parent_id
    WHERE up.depth < 8
), expected AS (
    SELECT up.ancestor AS user_id, b.currency, sum(b.amount * up.commission_bps / 10000) AS e
    FROM bets b JOIN up ON up.player = b.user_id
    GROUP BY 1, 2
)
SELECT count(*) FROM expected e
FULL JOIN commission_totals t USING (user_id, currency)
WHERE COALESCE(e.e, 0) <> COALESCE(t.earned, 0)
"""


async def _redis_cpu(redis: aioredis.Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def _del_pattern(redis: aioredis.Redis, pattern: str) -> int:
    n = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            n += await redis.unlink(*batch)
            batch = []
    if batch:
        n += await redis.unlink(*batch)
    return n


async def snapshot(redis: aioredis.Redis, keys: Keys) -> int:
    total = 0
    for stream in keys.all_outboxes():
        if await redis.exists(stream):
            await redis.copy(stream, stream + SUFFIX, replace=True)
            total += int(await redis.xlen(stream))
    return total


async def restore(redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys) -> int:
    total = 0
    for stream in keys.all_outboxes():
        await redis.delete(stream)
        if await redis.exists(stream + SUFFIX):
            await redis.copy(stream + SUFFIX, stream)
            await redis.xgroup_destroy(stream, outbox.GROUP)
            total += int(await redis.xlen(stream))
    for what in ("ccred", "cconfirmed", "plock"):
        await _del_pattern(redis, keys.scan_match(what))
    await redis.delete(keys.commission_lease(), keys.outbox_dead())
    await pool.execute("TRUNCATE bets, ledger, commission_flushes, commission_totals")
    await pool.execute("VACUUM ANALYZE bets")
    await pool.execute("VACUUM ANALYZE ledger")
    commissions.clear_chains()  # a cold cache, as a new worker
    return total


async def drain(settings: Settings, batch: int) -> dict[str, Any]:
    redis = aioredis.Redis.from_url(settings.redis_url)
    pool = await actors.open_pool(settings)
    keys = Keys(settings.key_prefix, settings.buckets)
    try:
        entries = await restore(redis, pool, keys)
        res = actors.Resources(settings, redis, pool, keys)
        last = [0.0, 0.0]
        handle = outbox.handle

        async def timed(*args: Any, **kwargs: Any) -> int:
            n = await handle(*args, **kwargs)
            if n:
                last[0], last[1] = time.monotonic(), time.process_time()
            return n

        outbox.handle = timed
        redis0 = await _redis_cpu(redis)
        wall0, cpu0 = time.monotonic(), time.process_time()
        handled = 0
        try:
            while True:
                handled += await actors.persist(res, 0, 1.0, batch)
                if await outbox.pending_count(redis, keys) == 0:
                    break
        finally:
            outbox.handle = handle
        wall, cpu = last[0] - wall0, last[1] - cpu0
        redis_cpu = await _redis_cpu(redis) - redis0
        f0 = time.process_time()
        report = await commissions.flush(redis, pool, keys)
        flush_cpu = time.process_time() - f0
        rows = await pool.fetchval("SELECT count(*) FROM bets")
        wrong = await pool.fetchval(_EXACT_SQL)
        return {
            "entries": entries, "handled": handled, "bets": rows,
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "cpu_ms_per_1000": round(cpu * 1e6 / max(1, entries), 1),
            "redis_cpu_ms_per_1000": round(redis_cpu * 1e6 / max(1, entries), 1),
            "entries_per_s": round(entries / wall) if wall > 0 else None,
            "flush_cpu_ms": round(flush_cpu * 1000, 1), "flush_bets": report.bets,
            "commissions_exact": wrong == 0,
        }
    finally:
        await pool.close()
        await redis.aclose()


async def feed(settings: Settings, rate: float) -> None:
    """XADD the snapshot's entries again, in their original order, at ``rate`` a second."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix, settings.buckets)
    try:
        entries: list[tuple[tuple[int, int], str, Any]] = []
        for stream in keys.all_outboxes():
            found: Any = await redis.xrange(stream + SUFFIX)
            for entry_id, fields in found:
                ms, _, seq = entry_id.partition(b"-")
                entries.append(((int(ms), int(seq)), stream, fields))
        entries.sort(key=lambda e: e[0])
        print(json.dumps({"feeding": len(entries)}), flush=True)
        start = time.monotonic()
        sent = 0
        while sent < len(entries):
            due = min(len(entries), int((time.monotonic() - start) * rate) + 1)
            if due > sent:
                pipe = redis.pipeline(transaction=False)
                for _, stream, fields in entries[sent:due]:
                    pipe.xadd(stream, fields)
                await pipe.execute()
                sent = due
            await asyncio.sleep(0.005)
    finally:
        await redis.aclose()


async def paced(settings: Settings, rate: float, batch: int) -> dict[str, Any]:
    """The worker at a steady ``rate``: a feeder process XADDs, ``persist_outbox`` jobs
    drain as the scheduler would run them; CPU of this process from the first entry handled
    to the last (idle blocking reads, lease renewals, job restarts included), lag of every
    tenth entry from its XADD to its ack (after COMMIT)."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    pool = await actors.open_pool(settings)
    keys = Keys(settings.key_prefix, settings.buckets)
    lags: list[int] = []
    handle = outbox.handle
    first: list[float] = []

    async def timed(redis_: aioredis.Redis, pool_: asyncpg.Pool, keys_: Keys,
                    entries: Sequence[outbox.Entry], *args: Any, **kwargs: Any) -> int:
        if entries and not first:
            first.extend((time.monotonic(), time.process_time()))
        n = await handle(redis_, pool_, keys_, entries, *args, **kwargs)
        now = int(time.time() * 1000)
        lags.extend(now - int(e.id.partition(b"-")[0]) for e in entries[::10])
        return n

    try:
        entries = await restore(redis, pool, keys)
        for stream in keys.all_outboxes():
            await redis.delete(stream)
        await outbox.ensure_groups(redis, keys)
        res = actors.Resources(settings, redis, pool, keys)
        outbox.handle = timed  # type: ignore[assignment]
        feeder = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.drainbench", "feed", "--rate", str(rate))
        redis0 = await _redis_cpu(redis)
        handled = 0
        try:
            while handled < entries:
                handled += await actors.persist(res, 0, settings.persist_run_s, batch)
        finally:
            outbox.handle = handle
            await feeder.wait()
        # From the first entry handled to the last: the feeder's start-up is left out.
        wall, cpu = time.monotonic() - first[0], time.process_time() - first[1]
        redis_cpu = await _redis_cpu(redis) - redis0
        await commissions.flush(redis, pool, keys)
        wrong = await pool.fetchval(_EXACT_SQL)
        lags.sort()
        return {
            "entries": entries, "handled": handled, "rate": rate, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "cores": round(cpu / wall, 3),
            "cpu_ms_per_1000": round(cpu * 1e6 / max(1, entries), 1),
            "redis_cpu_ms_per_1000": round(redis_cpu * 1e6 / max(1, entries), 1),
            "lag_p50_ms": lags[len(lags) // 2], "lag_p99_ms": lags[len(lags) * 99 // 100],
            "lag_max_ms": lags[-1], "commissions_exact": wrong == 0,
        }
    finally:
        await pool.close()
        await redis.aclose()


async def _snapshot(settings: Settings) -> None:
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        n = await snapshot(redis, Keys(settings.key_prefix, settings.buckets))
        print(f"snapshot: {n} entries")
    finally:
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drainbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("snapshot", "run", "paced", "feed"))
    parser.add_argument("--rate", type=float, default=5000.0,
                        help="paced and feed: entries per second (5000)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=actors.BATCH,
                        help=f"entries per stream per batch ({actors.BATCH})")
    args = parser.parse_args(argv)
    if args.command != "feed" and not ({"REDIS_URL", "DATABASE_URL"} <= os.environ.keys()):
        print("drainbench empties tables and keys: set REDIS_URL and DATABASE_URL to a Redis "
              "and a database of its own", file=sys.stderr)
        return 2
    settings = Settings()
    configure_logging(settings.log_level)
    if settings.persist_shards != 1:
        print("drainbench drains shard 0 of 1: unset PERSIST_SHARDS", file=sys.stderr)
        return 2
    if args.command == "snapshot":
        asyncio.run(_snapshot(settings))
        return 0
    if args.command == "feed":
        asyncio.run(feed(settings, args.rate))
        return 0
    run = asyncio.run
    if args.command == "paced":
        for i in range(args.runs):
            result = run(paced(settings, args.rate, args.batch))
            print(json.dumps({"run": i + 1, **result}), flush=True)
        return 0
    results = []
    for i in range(args.runs):
        result = run(drain(settings, args.batch))
        results.append(result)
        print(json.dumps({"run": i + 1, **result}), flush=True)
    cpus = sorted(r["cpu_ms_per_1000"] for r in results)
    rates = sorted(r["entries_per_s"] or 0 for r in results)
    print(f"worker CPU per 1,000 entries: min {cpus[0]} / median {statistics.median(cpus)} / "
          f"max {cpus[-1]} ms; drain rate min {rates[0]} / median "
          f"{statistics.median(rates)} / max {rates[-1]} entries/s; pid {os.getpid()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
