"""The Dramatiq workers end to end: real ``dramatiq workers.actors`` and
``workers.scheduler`` processes against a Redis and a database of their own, behind a game
server whose in-process persister is off. The bets land in PostgreSQL once, the commissions
are paid once, and a job that fails after COMMIT and before XACK is completed by Dramatiq's
own retry without a duplicate row or a second payment."""

from __future__ import annotations

import asyncpg
import pytest

from tests.helpers import Api
from tests.workerprocs import (
    Stack,
    Tree,
    bet_counts,
    betting_tree,
    paid_exactly,
    persisted_once,
    persisted_stakes,
    play,
)
from workers.actors import ShardKeys
from workers.broker import broker_url

pytestmark = pytest.mark.timeout(120)


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


async def test_workers_persist_and_pay(
    stack_api: Api, stack: Stack, stack_pool: asyncpg.Pool
) -> None:
    pool = stack_pool
    tree, ids, stakes = await betting_tree(stack_api, players=3, bets=15)
    # Nobody persists without workers: every acknowledged bet is still in the outbox.
    assert await stack.pending() == len(ids) + len(tree.players)  # and each deposit
    assert await bet_counts(pool, ids) == {}

    worker, scheduler = stack.worker(), stack.scheduler()
    try:
        await persisted_once(stack, pool, ids)
        # More bets while they run: persisted within a few seconds as well.
        more, more_stakes = await play(stack_api, tree, bets=5)
        ids += more
        stakes += more_stakes
        await persisted_once(stack, pool, ids)
        await paid_exactly(pool, stack, tree, stakes)
        assert await stack.pending() == 0
        assert worker.alive() and scheduler.alive(), stack.logs()
    finally:
        assert scheduler.stop() == 0, stack.logs()
        assert worker.stop() == 0, stack.logs()
    stack.assert_audit_passes()


async def test_raise_after_commit_is_retried_by_dramatiq(
    stack_api: Api, stack: Stack, stack_pool: asyncpg.Pool
) -> None:
    """No scheduler: one message, its first run fails after COMMIT and before XACK (and so
    before the accrual, which is part of the ack); Dramatiq's Retries middleware runs it
    again, which completes the batch."""
    pool = stack_pool
    tree, ids, stakes = await betting_tree(stack_api, players=2, bets=10)
    worker = stack.worker(fault="persist_after_commit:raise")
    try:
        stack.send("persist_outbox", 0)
        await persisted_once(stack, pool, ids, drained=True)
        log = worker.log.read_text()
        assert "fault injected at persist_after_commit" in log, stack.logs()
        assert "Retrying message" in log, stack.logs()
        # Written twice (first run and retry), stored once, paid once: flushes are enqueued
        # by hand (no scheduler) until nothing is left to pay.
        await paid_exactly(pool, stack, tree, stakes,
                           nudge=lambda: stack.send("flush_commissions"))
        assert sorted(await persisted_stakes(pool, [u for u, _ in tree.players])) == sorted(
            stakes)
    finally:
        assert worker.stop() == 0, stack.logs()
    stack.assert_audit_passes()


async def test_two_schedulers_and_two_workers_change_nothing(
    stack_api: Api, stack: Stack, stack_pool: asyncpg.Pool
) -> None:
    pool = stack_pool
    tree = await Tree.create(stack_api, players=2)
    procs = [stack.worker(), stack.worker(), stack.scheduler(), stack.scheduler()]
    try:
        ids, stakes = await play(stack_api, tree, bets=12)
        await persisted_once(stack, pool, ids)
        await paid_exactly(pool, stack, tree, stakes)
    finally:
        for proc in reversed(procs):
            assert proc.stop() == 0, stack.logs()
    stack.assert_audit_passes()
