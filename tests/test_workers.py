"""The Dramatiq workers end to end: real ``dramatiq workers.actors`` and
``workers.scheduler`` processes against a Redis and a database of their own, behind a game
server whose in-process persister is off. The bets land in PostgreSQL once, the commissions
are paid once, and a job that fails after COMMIT and before XACK is completed by Dramatiq's
own retry without a duplicate row or a second payment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from tests.conftest import ADMIN_TOKEN, started
from tests.helpers import Api
from tests.workerprocs import (
    Stack,
    Tree,
    bet_counts,
    eventually,
    paid_exactly,
    persisted_stakes,
    play,
)
from workers.actors import ShardKeys
from workers.broker import broker_url

pytestmark = pytest.mark.timeout(120)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    s = await Stack.create(tmp_path_factory.mktemp("workers"))
    yield s
    await s.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(stack: Stack) -> AsyncIterator[Api]:
    """A game server in this process with the in-process persister off: only workers persist."""
    server, task, address = await started(stack.settings)
    async with Api(address, ADMIN_TOKEN) as client:
        yield client
    server.should_exit = True
    await task


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(stack.settings.database_url, min_size=1, max_size=2)
    yield p
    await p.close()


def test_broker_lives_beside_the_balances() -> None:
    from plumbing.settings import Settings

    def url(**given: str) -> str:
        return broker_url(Settings(**given), is_cluster=lambda _: False)

    assert url(redis_url="redis://h:7000/0") == "redis://h:7000/1"
    assert url(redis_url="redis://:pw@h:7000") == "redis://:pw@h:7000/1"
    assert url(redis_url="redis://h/1") == "redis://h/2"
    assert url(redis_url="redis://h/0", broker_url="redis://b/3") == "redis://b/3"


def test_shards_split_the_buckets() -> None:
    owned = [ShardKeys("p", 10, s, 3).all_outboxes() for s in range(3)]
    assert sorted(k for o in owned for k in o) == sorted(ShardKeys("p", 10).all_outboxes())
    assert owned[1] == ["p:outbox:{b1}", "p:outbox:{b4}", "p:outbox:{b7}"]


async def test_workers_persist_and_pay(api: Api, stack: Stack, pool: asyncpg.Pool) -> None:
    tree = await Tree.create(api, players=3)
    ids, stakes = await play(api, tree, bets=15)
    await asyncio.sleep(0.3)
    assert await bet_counts(pool, ids) == {}  # nobody persists without workers
    assert await stack.pending() > 0

    worker, scheduler = stack.worker(), stack.scheduler()
    try:
        async def all_in() -> bool:
            return await bet_counts(pool, ids) == dict.fromkeys(ids, 1)

        await eventually(all_in)
        # More bets while they run: persisted within a few seconds as well.
        more, more_stakes = await play(api, tree, bets=5)
        ids += more
        stakes += more_stakes
        await eventually(all_in)
        await paid_exactly(pool, stack, tree, stakes)
        assert await stack.pending() == 0
        assert worker.alive() and scheduler.alive(), stack.logs()
    finally:
        assert scheduler.stop() == 0, stack.logs()
        assert worker.stop() == 0, stack.logs()
    audit = stack.audit()
    assert audit.returncode == 0, audit.stdout + audit.stderr


async def test_raise_after_commit_is_retried_by_dramatiq(
    api: Api, stack: Stack, pool: asyncpg.Pool
) -> None:
    """No scheduler: one message, its first run fails after COMMIT and before XACK;
    Dramatiq's Retries middleware runs it again, which completes the batch."""
    tree = await Tree.create(api, players=2)
    ids, stakes = await play(api, tree, bets=10)
    worker = stack.worker(fault="persist_after_commit:raise")
    try:
        stack.send("persist_outbox", 0)

        async def all_in() -> Any:
            return await bet_counts(pool, ids) == dict.fromkeys(ids, 1) and (
                await stack.pending() == 0)

        await eventually(all_in)
        log = worker.log.read_text()
        assert "fault injected at persist_after_commit" in log, stack.logs()
        assert "Retrying message" in log, stack.logs()
        # Written twice (first run and retry), stored once, paid once.
        for _ in range(3):
            stack.send("flush_commissions")
            await asyncio.sleep(stack.settings.commission_flush_s)
        await paid_exactly(pool, stack, tree, stakes)
        assert sorted(await persisted_stakes(pool, [u for u, _ in tree.players])) == sorted(
            stakes)
    finally:
        assert worker.stop() == 0, stack.logs()
    audit = stack.audit()
    assert audit.returncode == 0, audit.stdout + audit.stderr


async def test_two_schedulers_and_two_workers_change_nothing(
    api: Api, stack: Stack, pool: asyncpg.Pool
) -> None:
    tree = await Tree.create(api, players=2)
    procs = [stack.worker(), stack.worker(), stack.scheduler(), stack.scheduler()]
    try:
        ids, stakes = await play(api, tree, bets=12)

        async def all_in() -> bool:
            return await bet_counts(pool, ids) == dict.fromkeys(ids, 1)

        await eventually(all_in)
        await paid_exactly(pool, stack, tree, stakes)
    finally:
        for proc in reversed(procs):
            assert proc.stop() == 0, stack.logs()
    audit = stack.audit()
    assert audit.returncode == 0, audit.stdout + audit.stderr
