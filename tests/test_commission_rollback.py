"""Redis rolls back to any point of a commission flush: nothing is paid twice, nothing lost.

Real processes: our own redis-server with an AOF (``appendfsync always``), the real
``dramatiq workers.actors`` and ``workers.scheduler``, a game server in this process. The
AOF is copied at the rollback point: before the flush's statement, between its commit and
its Redis credit (the worker SIGKILLed there), or after the credit and before it is
confirmed (likewise). Then the stack goes on past it (everything persisted, paid, credited
and recorded as credited), the workers stop, Redis is SIGKILLed and restarted from the
copy, and the workers start again, with nothing else done by hand. They must replay the
outbox entries Redis brought back without writing or paying anything twice, give back the
credits Redis lost, and leave every (bet, ancestor) paid ``floor(amount x bps / 10000)``
exactly once, in PostgreSQL and in Redis; ``python -m ops.audit`` passes.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tests.conftest import ADMIN_TOKEN, started
from tests.helpers import Api
from tests.workerprocs import Stack, Tree, bet_counts, earned, eventually, play, redis_balances

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest_asyncio.fixture(loop_scope="session")
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await Stack.create(tmp_path)
    s.redis_server.stop()
    s.redis_server.appendonly = True
    s.redis_server.start()
    await always(s)
    yield s
    await s.close()


async def always(stack: Stack) -> None:
    """Every write on disk before its reply: the copy holds exactly what Redis had."""
    client = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        await client.config_set("appendfsync", "always")
    finally:
        await client.aclose()


def copy_aof(stack: Stack, to: Path) -> None:
    shutil.copytree(stack.redis_server.dir / "appendonlydir", to)


async def restart_from(stack: Stack, copy: Path) -> None:
    """SIGKILL Redis and start it again from the AOF as it was at the copy."""
    stack.redis_server.stop(kill=True)
    aof = stack.redis_server.dir / "appendonlydir"
    shutil.rmtree(aof)
    shutil.copytree(copy, aof)
    stack.redis_server.start()
    await always(stack)


async def uncredited(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval(
        "SELECT count(*) FROM commission_flushes WHERE credited_at IS NULL"))


async def settled(stack: Stack, pool: asyncpg.Pool, tree: Tree, ids: list[str],
                  stakes: list[int]) -> None:
    """Every bet once, the outbox empty, every commission paid, credited, recorded."""
    owed = tree.expected(stakes)
    ancestors = list(owed)

    async def done() -> bool:
        return (await stack.pending() == 0
                and await bet_counts(pool, ids) == dict.fromkeys(ids, 1)
                and await earned(pool, ancestors) == owed
                and await redis_balances(stack, ancestors) == owed
                and await uncredited(pool) == 0)

    await eventually(done, 40.0)


@pytest.mark.parametrize("point", ["before_commit", "after_commit", "after_credit"])
async def test_redis_rolls_back_to_a_point_of_the_flush(
    point: str, stack: Stack, tmp_path: Path
) -> None:
    server, task, address = await started(stack.settings)
    pool = await asyncpg.create_pool(stack.settings.database_url, min_size=1, max_size=2)
    try:
        async with Api(address, ADMIN_TOKEN) as api:
            tree = await Tree.create(api, players=2)
            ids, stakes = await play(api, tree, bets=10)
        server.should_exit = True
        await task
        ancestors = [int(uid) for uid, _ in tree.chain]
        copy = tmp_path / "aof-copy"
        if point == "before_commit":
            copy_aof(stack, copy)  # the bets are in the outbox; nothing persisted or paid
        else:
            scheduler = stack.scheduler()
            worker = stack.worker(fault=f"flush_{point}:kill")
            assert await worker.exited() != 0, stack.logs()
            assert scheduler.stop() == 0, stack.logs()
            assert sum((await earned(pool, ancestors)).values()) > 0  # PostgreSQL paid
            assert await uncredited(pool) >= 1
            copy_aof(stack, copy)

        # Redis goes on past the copy: everything paid, credited and recorded.
        procs = [stack.worker(), stack.scheduler()]
        try:
            await settled(stack, pool, tree, ids, stakes)
        finally:
            for proc in reversed(procs):
                assert proc.stop() == 0, stack.logs()
        flushes = await pool.fetchval("SELECT count(*) FROM commission_flushes")

        await restart_from(stack, copy)
        lost = await redis_balances(stack, ancestors)
        assert all(lost[a] <= tree.expected(stakes)[a] for a in ancestors)
        if point != "after_credit":  # the credits were made after the copy: gone
            assert lost == dict.fromkeys(ancestors, 0)

        procs = [stack.worker(), stack.scheduler()]
        try:
            await settled(stack, pool, tree, ids, stakes)
            # Nothing paid again: the replayed entries found their rows, no bet was due.
            assert await pool.fetchval("SELECT count(*) FROM commission_flushes") == flushes
            rows = await pool.fetchval(
                "SELECT count(*) FROM ledger WHERE kind = 'commission'"
                " AND user_id = ANY($1::bigint[])", ancestors)
            assert rows <= len(ancestors) * flushes
            audit = stack.audit()
            assert audit.returncode == 0, audit.stdout + audit.stderr
        finally:
            for proc in reversed(procs):
                assert proc.stop() == 0, stack.logs()
    finally:
        await pool.close()
        if not task.done():
            server.should_exit = True
            await task
