"""The workers and the operator commands on a real Redis Cluster (3 masters, 3 replicas:
tests/rediscluster.py).

The bets are real: :class:`tests.workerprocs.Wallets` runs the game server's wallet over
the bet path's cluster connection, so balances, seed pairs, outbox entries and PostgreSQL
rows are what a server on the cluster writes. The outbox is drained per bucket stream (a
multi-stream read or ack is CROSSSLOT there), two Dramatiq worker processes persist and
pay a commission storm exactly once, and the audit and the rebuild walk every master.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from plumbing import heal
from plumbing.settings import Settings
from tests.conftest import ADMIN_TOKEN, free_port, serve
from tests.helpers import Api
from tests.rediscluster import RedisCluster, command
from tests.workerprocs import (
    DIFF,
    ROOT,
    Stack,
    Tree,
    Wallets,
    bet_counts,
    direct_play,
    direct_tree,
    eventually,
    ledger_equals_redis,
    ledger_matches,
    paid_exactly,
    persisted_once,
    play,
)
from workers import commissions, outbox
from workers.persister import Persister

pytestmark = pytest.mark.timeout(300)


def masters_of(wallets: Wallets, users: list[int]) -> set[str]:
    """The masters holding these users' keys, by node name."""
    client = wallets.redis
    assert not isinstance(client, type(None))
    names = set()
    for uid in users:
        node = client.get_node_from_key(wallets.keys.balances(uid))  # type: ignore[union-attr]
        names.add(node.name)
    return names


# -- the outbox drain, in this process ---------------------------------------------------------


async def test_the_drain_reads_and_acks_every_bucket_on_every_master(
    cluster_settings: Settings,
) -> None:
    settings = cluster_settings.model_copy(update={"buckets": 16})
    async with Wallets.on(settings) as w:
        tree = await direct_tree(w, players=12)
        players = [uid for uid, _ in tree.players]
        assert len(masters_of(w, players)) == 3  # the test means something only so
        ids, _ = await direct_play(w, tree, bets=3)
        assert await outbox.pending_count(w.redis, w.keys) == len(ids) + len(players)

        await outbox.ensure_groups(w.redis, w.keys)
        await outbox.ensure_groups(w.redis, w.keys)  # BUSYGROUP per stream: fine
        # A consumer reads a batch and dies before writing it: its entries stay pending.
        taken = await outbox._read(w.redis, w.keys, "dead", 1000, 0, outbox.GROUP, ">")
        assert len(taken) == len(ids) + len(players)
        assert len({e.stream for e in taken}) > 3  # from many buckets, in one read
        assert await outbox.drain_once(w.redis, w.pool, w.keys, "live", block_ms=0) == 0
        # Its own pending list, then a reclaim by another consumer, persist them once.
        assert await outbox.reclaim(w.redis, w.pool, w.keys, "live", min_idle_ms=0) == len(taken)
        assert await bet_counts(w.pool, ids) == dict.fromkeys(ids, 1)
        assert await outbox.pending_count(w.redis, w.keys) == 0

        # New bets, a blocking read that polls (no BLOCK across slots) and finds them.
        more, _ = await direct_play(w, tree, bets=2)
        assert await outbox.drain_once(w.redis, w.pool, w.keys, "live", block_ms=2000) > 0
        while await outbox.drain_once(w.redis, w.pool, w.keys, "live", block_ms=0):
            pass
        assert await bet_counts(w.pool, more) == dict.fromkeys(more, 1)
        assert await outbox.pending_count(w.redis, w.keys) == 0
        # An empty blocking read waits, then answers nothing.
        started = asyncio.get_running_loop().time()
        assert await outbox.drain_once(w.redis, w.pool, w.keys, "live", block_ms=300) == 0
        assert asyncio.get_running_loop().time() - started >= 0.3

        # The in-process persister (the server's, beside it) on the cluster, with its flush.
        persister = Persister(w.redis, w.pool, w.keys, "inproc", commission_flush_s=0.3)
        persister.start()
        try:
            last, _ = await direct_play(w, tree, bets=2)

            async def stored() -> bool:
                return await bet_counts(w.pool, last) == dict.fromkeys(last, 1)

            await eventually(stored)
        finally:
            await persister.close()
        assert await outbox.pending_count(w.redis, w.keys) == 0
        assert await ledger_matches(w.redis, w.keys, w.pool, players), DIFF


# -- worker processes on the cluster -----------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(redis_cluster: RedisCluster,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """Workers on the cluster, their broker a plain Redis of their own; three persist
    shards, so that two worker processes drain at the same time."""
    s = await Stack.on_cluster(tmp_path_factory.mktemp("cluster-workers"),
                               redis_cluster.nodes[2].url, persist_shards=3)
    yield s
    await s.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def wallets(stack: Stack) -> AsyncIterator[Wallets]:
    async with Wallets.on(stack.settings) as w:
        yield w


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(stack.settings.database_url, min_size=1, max_size=2)
    yield p
    await p.close()


def clean_logs(stack: Stack) -> None:
    """No call met CROSSSLOT or a redirect it did not follow, no job failed."""
    text = "\n".join(p.log.read_text(errors="replace") for p in stack.procs if p.log.exists())
    for bad in ("CROSSSLOT", "MOVED", "Traceback", "persist_cancelled", "error"):
        assert bad not in text, stack.logs()


@contextlib.asynccontextmanager
async def two_workers(stack: Stack) -> AsyncIterator[None]:
    """Two worker processes and a scheduler for the block; after it, each was alive and
    stops cleanly, no log shows CROSSSLOT, a redirect or a failed job, the audit passes."""
    procs = [stack.worker(), stack.worker(), stack.scheduler()]
    try:
        yield
        assert all(proc.alive() for proc in procs), stack.logs()
    finally:
        for proc in reversed(procs):
            assert proc.stop() == 0, stack.logs()
    clean_logs(stack)
    stack.assert_audit_passes()


async def stored_and_paid_once(stack: Stack, pool: asyncpg.Pool, tree: Tree, ids: list[str],
                               stakes: list[int]) -> None:
    """Every bet stored once, every commission of ``stakes`` paid once, and the players' and
    ancestors' Redis balances equal to the ledger."""
    await persisted_once(stack, pool, ids, drained=True, within=60)
    await paid_exactly(pool, stack, tree, stakes)
    users = [uid for uid, _ in tree.players] + [int(uid) for uid, _ in tree.chain]
    assert await ledger_equals_redis(stack, pool, users), DIFF


async def test_two_workers_persist_and_pay_a_storm_exactly_once(
    stack: Stack, wallets: Wallets, pool: asyncpg.Pool,
) -> None:
    tree = await direct_tree(wallets, players=30)
    players = [uid for uid, _ in tree.players]
    assert len(masters_of(wallets, players)) == 3
    async with two_workers(stack):
        ids, stakes = await direct_play(wallets, tree, bets=12)
        assert len(ids) == len(set(ids)) == 360
        await stored_and_paid_once(stack, pool, tree, ids, stakes)


async def test_the_storm_over_the_wire_through_a_game_server_on_the_cluster(
    stack: Stack, wallets: Wallets, pool: asyncpg.Pool,
) -> None:
    """The commission storm as players make it: over WebSockets to a game server on the
    cluster (its in-process persister off), two worker processes and a scheduler behind:
    every bet stored once, every commission paid once, the ledger equals Redis, the audit
    passes, no CROSSSLOT or MOVED in any log."""
    async with two_workers(stack):
        async with serve(stack.settings) as served, Api(served.address, ADMIN_TOKEN) as api:
            tree = await Tree.create(api, players=24)
            players = [uid for uid, _ in tree.players]
            assert len(masters_of(wallets, players)) == 3
            ids, stakes = await play(api, tree, bets=15)
        assert len(ids) == len(set(ids)) == 24 * 15
        await stored_and_paid_once(stack, pool, tree, ids, stakes)


async def test_workers_ride_a_manual_failover_under_load(
    stack: Stack, wallets: Wallets, pool: asyncpg.Pool, redis_cluster: RedisCluster,
) -> None:
    """CLUSTER FAILOVER of the master of some players while they bet and two workers drain:
    bets continue (resent while UNAVAILABLE), every one is stored once, every commission
    paid once, the ledger equals Redis and the audit passes."""
    tree = await direct_tree(wallets, players=18, deposit=10_000_000)
    players = [uid for uid, _ in tree.players]
    assert len(masters_of(wallets, players)) == 3
    by_port = {node.port: node for node in redis_cluster.nodes}
    owner = by_port[wallets.redis.get_node_from_key(  # type: ignore[union-attr]
        wallets.keys.balances(players[0])).port]
    replica = redis_cluster.replica_of(owner)
    ids: list[str] = []
    stakes: list[int] = []
    stop = asyncio.Event()

    async def bets_of(uid: int) -> None:
        i = 0
        while not stop.is_set():
            amount = 100 + 37 * (i % 50)
            try:
                async with asyncio.timeout(40):  # a bet never answered fails the test
                    result = await wallets.bet(uid, amount,
                                               direction="under" if i % 2 else "over")
            except TimeoutError:
                state = wallets.wallet.user(uid)
                raise AssertionError(
                    f"user {uid}: a bet unanswered for 40 s (inflight {state.inflight}, "
                    f"queued {len(state.queue)}, ready {state.ready}, locked "
                    f"{state.lock.locked()}, heal {state.needs_heal}, rotate "
                    f"{state.needs_rotation}, wallet {wallets.wallet.__dict__}, resent "
                    f"{wallets.resent})") from None
            ids.append(result.bet_id)
            stakes.append(amount)
            i += 1

    procs = [stack.worker(), stack.worker(), stack.scheduler()]
    load = asyncio.gather(*(bets_of(uid) for uid in players))
    try:
        async def some_stored() -> bool:
            return bool(await pool.fetchval("SELECT count(*) FROM bets WHERE user_id ="
                                            " ANY($1::bigint[])", players))

        await eventually(some_stored)
        before = len(ids)
        command(replica.port, "CLUSTER", "FAILOVER")
        await eventually(lambda: _true(redis_cluster.is_master(replica)), within=30)
        after = len(ids)
        await asyncio.sleep(2.0)  # bets go on against the new master
        stop.set()
        await load
        assert len(ids) > after >= before, (before, after, len(ids))
        await stored_and_paid_once(stack, pool, tree, ids, stakes)
        assert all(proc.alive() for proc in procs), stack.logs()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await load
        for proc in reversed(procs):
            assert proc.stop() == 0, stack.logs()
        redis_cluster.wait_ok(time.monotonic() + 60)
    text = "\n".join(p.log.read_text(errors="replace") for p in procs)
    assert "CROSSSLOT" not in text, stack.logs()
    stack.assert_audit_passes()


async def _true(value: bool) -> bool:
    return value


# -- the audit and the rebuild over every master -----------------------------------------------


def tool(stack: Stack, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=stack.env(),
                          capture_output=True, text=True, timeout=120)


async def storm_users(wallets: Wallets, pool: asyncpg.Pool) -> list[int]:
    """Every user of the stack's database (players and ancestors, on every master): the
    storm's, or, when this test runs first, bets of its own persisted here."""
    if not await pool.fetchval("SELECT count(*) FROM bets"):
        tree = await direct_tree(wallets, players=12)
        await direct_play(wallets, tree, bets=3)
        await outbox.ensure_groups(wallets.redis, wallets.keys)
        while await outbox.drain_once(wallets.redis, pool, wallets.keys, "storm-users",
                                      block_ms=0):
            pass
        for _ in range(2):  # pay, then record the credit
            await commissions.flush(wallets.redis, pool, wallets.keys)
    users = [int(r[0]) for r in await pool.fetch("SELECT user_id FROM users")]
    assert len(masters_of(wallets, users)) == 3
    for uid in users:  # after the failover test: what a server does at each one's next use
        if not await heal.is_healed(wallets.redis, wallets.keys, uid):
            await heal.heal(wallets.redis, pool, wallets.keys, uid)
    return users


async def test_the_audit_judges_every_master(stack: Stack, wallets: Wallets,
                                             pool: asyncpg.Pool) -> None:
    users = await storm_users(wallets, pool)
    clean = tool(stack, "ops.audit")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    # Each user's heal marker is judged by the run id of its own master: none awaits a heal.
    assert "awaiting heal 0 users" in clean.stdout, clean.stdout
    judged = await pool.fetchval("SELECT count(DISTINCT user_id) FROM ledger")
    assert f"users {judged}" in clean.stdout, clean.stdout  # found on every master

    # One stale marker on each master: counted (the balance is then what a heal would set).
    stale = {wallets.redis.get_node_from_key(  # type: ignore[union-attr]
        wallets.keys.healed(u)).name: u for u in users}
    assert len(stale) == 3
    for uid in stale.values():
        await wallets.redis.set(wallets.keys.healed(uid), "0" * 40)
    tampered = next(u for u in users if u not in stale.values())
    await wallets.redis.hincrby(wallets.keys.balances(tampered), "USDT", 1)
    try:
        found = tool(stack, "ops.audit", "--retries", "0")
        assert found.returncode == 1, found.stdout + found.stderr
        assert "awaiting heal 3 users" in found.stdout, found.stdout
        assert f"[balances] user {tampered} USDT" in found.stdout, found.stdout
        assert "off by +1" in found.stdout and "AUDIT FAILED: 2 problem(s)" in found.stdout, (
            found.stdout)
    finally:
        await wallets.redis.hincrby(wallets.keys.balances(tampered), "USDT", -1)
        for uid in stale.values():
            await heal.heal(wallets.redis, pool, wallets.keys, uid)
    again = tool(stack, "ops.audit")
    assert again.returncode == 0 and "awaiting heal 0 users" in again.stdout, again.stdout


async def test_the_rebuild_restores_every_master(stack: Stack, wallets: Wallets,
                                                 pool: asyncpg.Pool) -> None:
    users = await storm_users(wallets, pool)
    # A bet not yet persisted: the rebuild refuses, changing nothing.
    player = int(await pool.fetchval("SELECT min(user_id) FROM users WHERE role = 'player'"))
    await wallets.bet(player, 100)
    # (and the reveal of its pair, when a failover made the bet rotate it first)
    waiting = await outbox.pending_count(wallets.redis, wallets.keys)
    assert waiting >= 1
    refused = tool(stack, "ops.rebuild")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"{waiting} outbox event(s)" in refused.stderr, refused.stderr
    while await outbox.drain_once(wallets.redis, pool, wallets.keys, "rebuild-test",
                                  block_ms=0):
        pass

    ledgered = [int(r[0]) for r in await pool.fetch("SELECT DISTINCT user_id FROM ledger")]
    assert len(masters_of(wallets, ledgered)) == 3
    for uid in ledgered:
        await wallets.redis.delete(wallets.keys.balances(uid), wallets.keys.healed(uid))
    # Money that is in no ledger: the rebuild removes it.
    await wallets.redis.hset(wallets.keys.balances(ledgered[0]), "BTC", "123")
    done = tool(stack, "ops.rebuild")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"rebuilt {len(ledgered)} balance hash(es)" in done.stdout, done.stdout
    assert await ledger_equals_redis(stack, pool, users), DIFF
    for uid in ledgered:  # healed under the run id of its own master
        assert await heal.is_healed(wallets.redis, wallets.keys, uid), uid
    audit = tool(stack, "ops.audit")
    assert audit.returncode == 0 and "awaiting heal 0 users" in audit.stdout, (
        audit.stdout + audit.stderr)


# -- the launcher ------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["", "cluster"])
def test_the_launcher_refuses_a_broker_on_the_cluster_before_anything_starts(
    redis_cluster: RedisCluster, broker: str,
) -> None:
    node = redis_cluster.nodes[0].url
    env = {k: v for k, v in os.environ.items() if k not in ("BROKER_URL", "REDIS_URL")}
    env.update({"REDIS_URL": node, "BROKER_URL": node if broker else "",
                # Nothing answers here: reaching the migration would fail differently.
                "DATABASE_URL": f"postgresql://root@127.0.0.1:{free_port()}/none"})
    done = subprocess.run([sys.executable, "-m", "stakepro"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    named = "BROKER_URL names a Redis Cluster node" if broker else "set BROKER_URL"
    assert named in done.stderr and "CROSSSLOT" in done.stderr, done.stderr
    assert done.stdout == "", done.stdout
