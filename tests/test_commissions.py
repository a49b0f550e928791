"""Commissions: exactly once per (bet, ancestor), whatever is replayed, retried or crashes.

The first tests drive :mod:`workers.commissions` (and :mod:`workers.outbox`) directly on
keys of their own prefix and a database of their own (a flush pays every due bet of its
database), with a chain of users inserted there; the last ones go through the real server:
sockets, the in-process persister and its flush loop.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import httpx
import msgpack
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from plumbing import heal
from plumbing.keys import Keys
from plumbing.settings import Settings
from tests.conftest import fresh_database
from tests.helpers import Api, Player, eventually
from workers import commissions, outbox

T = TypeVar("T")
SM_BPS, MASTER_BPS, AGENT_BPS = 20, 30, 50




def share(amount: int, bps: int) -> int:
    """The rule, written out independently of games.commission."""
    return amount * bps // 10000


@dataclass
class Chain:
    super_master: int
    master: int
    agent: int
    players: list[int]

    @property
    def ancestors(self) -> dict[int, int]:
        return {self.agent: AGENT_BPS, self.master: MASTER_BPS, self.super_master: SM_BPS}


@dataclass
class Env:
    redis: aioredis.Redis
    pool: asyncpg.Pool
    keys: Keys

    async def user(self, role: str, parent: int | None = None, bps: int = 0) -> int:
        uid = int(await self.pool.fetchval(
            "INSERT INTO users (role, parent_id, commission_bps, name, token_hash)"
            " VALUES ($1, $2, $3, 'u', $4) RETURNING user_id", role, parent, bps,
            os.urandom(16)))
        await heal.mark_new(self.redis, self.keys, uid)  # as the server does on creation
        return uid

    async def chain(self, players: int = 3) -> Chain:
        sm = await self.user("super_master", None, SM_BPS)
        m = await self.user("master", sm, MASTER_BPS)
        a = await self.user("agent", m, AGENT_BPS)
        return Chain(sm, m, a, [await self.user("player", a) for _ in range(players)])

    async def persist(self, bets: Sequence[dict[str, Any]]) -> None:
        """Store the bets the one way there is: as outbox entries persisted (each with its
        player's chain) and acknowledged (lua/outbox-ack-n.lua)."""
        await outbox.ensure_groups(self.redis, self.keys)
        for i, b in enumerate(bets):
            await self.redis.xadd(self.keys.outbox_for(b["user_id"]), bet_entry(b, i + 1))
        while await outbox.drain_once(self.redis, self.pool, self.keys, "persist", block_ms=0):
            pass

    async def flush(self, batch_id: str | None = None) -> commissions.FlushReport:
        return await commissions.flush(self.redis, self.pool, self.keys, batch_id)

    async def paid(self, user_id: int) -> tuple[int, int, int, int]:
        """(ledger sum, ledger rows, commission_totals, Redis balance) of USDT."""
        row = await self.pool.fetchrow(
            "SELECT coalesce(sum(delta), 0)::bigint AS s, count(*) AS n FROM ledger"
            " WHERE user_id = $1 AND kind = 'commission' AND currency = 'USDT'", user_id)
        assert row is not None
        total = await self.pool.fetchval(
            "SELECT earned FROM commission_totals WHERE user_id = $1 AND currency = 'USDT'",
            user_id) or 0
        balance = await self.redis.hget(self.keys.balances(user_id), "USDT")
        return int(row["s"]), int(row["n"]), int(total), int(balance or 0)

    async def assert_paid(self, chain: Chain, bets: Sequence[dict[str, Any]]) -> None:
        for ancestor, bps in chain.ancestors.items():
            expected = sum(share(b["amount"], bps) for b in bets)
            ledger, _, total, balance = await self.paid(ancestor)
            assert (ledger, total, balance) == (expected, expected, expected), ancestor

    async def leftovers(self) -> list[Any]:
        """What is still to do: due bets, and flushes not recorded as credited."""
        due = await self.pool.fetch("SELECT bet_id FROM bets WHERE commission_flush IS NULL"
                                    " AND commission_to IS NOT NULL")
        open_ = await self.pool.fetch("SELECT flush_id FROM commission_flushes"
                                      " WHERE credited_at IS NULL")
        return [r[0] for r in [*due, *open_]]

    async def settle(self) -> None:
        """Two more flushes: the first credits what is left, the second records it."""
        await self.flush()
        await self.flush()


@pytest_asyncio.fixture(scope="module")
async def own_database(settings: Settings) -> AsyncIterator[str]:
    async with fresh_database(settings.database_url) as dsn:
        yield dsn


@pytest_asyncio.fixture
async def env(settings: Settings, own_database: str) -> AsyncIterator[Env]:
    redis = aioredis.Redis.from_url(settings.redis_url)
    pool = await asyncpg.create_pool(own_database, min_size=1, max_size=8)
    keys = Keys(f"c{uuid.uuid4().hex[:6]}", 4)
    # An earlier test's leftovers (its key prefix, not ours) are not ours to pay or credit.
    await pool.execute("UPDATE bets SET commission_flush = 'other-test'"
                       " WHERE commission_flush IS NULL")
    await pool.execute("DELETE FROM commission_flushes")
    yield Env(redis, pool, keys)
    await pool.close()
    await redis.aclose()


def bets_of(players: Sequence[int], amounts: Sequence[int]) -> list[dict[str, Any]]:
    tag = uuid.uuid4().hex[:8]
    return [{"bet_id": f"{tag}-{i}", "user_id": players[i % len(players)], "currency": "USDT",
             "amount": amount} for i, amount in enumerate(amounts)]


#: Stakes whose shares need flooring, and one near the top of bigint (amount * bps would
#: overflow it: the statement must still floor exactly).
AMOUNTS = [1, 19, 199, 200, 333, 5000, 12345, 99999, 10**12 + 7, 2**62 + 12345]


# -- workers.commissions directly ------------------------------------------------------------


async def _outbox_bets(env: Env, chain: Chain, amounts: Sequence[int]) -> list[dict[str, Any]]:
    await outbox.ensure_groups(env.redis, env.keys)
    bets = bets_of(chain.players, amounts)
    for i, b in enumerate(bets):
        await env.redis.xadd(env.keys.outbox_for(b["user_id"]), bet_entry(b, i + 1))
    return bets


def bet_entry(bet: dict[str, Any], nonce: int) -> dict[str, Any]:
    """The outbox entry of one of bets_of()'s bets, settled as a loss."""
    event = {**bet, "pair_id": 1, "payout": 0, "roll": 9000, "target": 5000,
             "direction": "under", "nonce": nonce, "multiplier": 19800,
             "server_seed_hash": "ab" * 32, "client_seed": "c", "ts": 1_700_000_000_000}
    return {"k": "bet", "e": msgpack.packb(event), "b": "0"}


async def test_worker_dies_after_commit_before_ack(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox path: the batch is replayed whole; no duplicate row, no double commission."""
    chain = await env.chain()
    bets = await _outbox_bets(env, chain, AMOUNTS[2:])

    async def ack_fails(*args: Any) -> None:
        raise ConnectionResetError("died after COMMIT, before XACK")

    monkeypatch.setattr(outbox, "_ack", ack_fails)
    with pytest.raises(ConnectionResetError):
        await outbox.drain_once(env.redis, env.pool, env.keys, "w1", block_ms=0)
    monkeypatch.undo()
    assert await outbox.pending_count(env.redis, env.keys) == len(bets)  # nothing acked
    # The rows are in, each with its chain: due once, whatever is replayed.
    assert len(await env.leftovers()) == len(bets)
    await env.flush()
    # A second worker reclaims the entries of the dead one (Dramatiq's retry path is the
    # same replay: the same events through write() and the ack again).
    assert await outbox.reclaim(env.redis, env.pool, env.keys, "w2", min_idle_ms=0) == len(bets)
    assert await outbox.pending_count(env.redis, env.keys) == 0
    await env.settle()
    n = await env.pool.fetchval("SELECT count(*) FROM bets WHERE bet_id = ANY($1::text[])",
                                [b["bet_id"] for b in bets])
    assert n == len(bets)
    await env.assert_paid(chain, bets)
    for ancestor in chain.ancestors:
        assert (await env.paid(ancestor))[1] == 1  # one flush paid, one ledger row
    assert await env.leftovers() == []


async def test_two_consumers_holding_the_same_entries_pay_once(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow consumer's entries reclaimed by another (or a lease that failed to exclude):
    both write the rows, both ack, flushes run in between; each bet is paid once."""
    chain = await env.chain()
    bets = await _outbox_bets(env, chain, AMOUNTS)
    # w1 reads and writes, and is held up just before its ack ...
    release = asyncio.Event()
    reached = asyncio.Event()
    ack = outbox._ack

    async def slow_ack(*args: Any) -> int:
        reached.set()
        await release.wait()
        return await ack(*args)

    monkeypatch.setattr(outbox, "_ack", slow_ack)
    slow = asyncio.create_task(
        outbox.drain_once(env.redis, env.pool, env.keys, "w1", block_ms=0))
    await reached.wait()
    monkeypatch.undo()
    await env.flush()
    # ... w2 takes some of them over, persists and acknowledges them first.
    taken = 0
    for stream in env.keys.all_outboxes():
        reply: Any = await env.redis.xautoclaim(stream, outbox.GROUP, "w2", 0, "0-0", count=1)
        taken += len(reply[1])
        if reply[1]:
            entries = [outbox.Entry(stream.encode(), i, f) for i, f in reply[1]]
            assert await outbox.handle(env.redis, env.pool, env.keys, entries,
                                       consumer="w2") == len(entries)
    assert 0 < taken < len(bets)
    await env.flush()
    release.set()
    assert await slow == len(bets)
    assert await outbox.pending_count(env.redis, env.keys) == 0
    await env.settle()
    await env.assert_paid(chain, bets)


async def test_a_replayed_outbox_batch_pays_nothing_again(env: Env) -> None:
    """A Redis rollback brings back entries already persisted, acknowledged and paid (the
    same events, same bet ids): they are written again (nothing new) and pay nothing."""
    chain = await env.chain()
    bets = await _outbox_bets(env, chain, AMOUNTS)
    entries = {s: await env.redis.xrange(s) for s in env.keys.all_outboxes()}
    while await outbox.drain_once(env.redis, env.pool, env.keys, "w1", block_ms=0):
        pass
    await env.settle()
    await env.assert_paid(chain, bets)
    for stream, items in entries.items():
        for _, fields in items:
            await env.redis.xadd(stream, fields)
    while await outbox.drain_once(env.redis, env.pool, env.keys, "w1", block_ms=0):
        pass
    assert await env.leftovers() == []
    await env.settle()
    await env.assert_paid(chain, bets)
    for ancestor in chain.ancestors:
        assert (await env.paid(ancestor))[1] == 1


async def test_each_bet_pays_the_rates_it_recorded(env: Env) -> None:
    """The rate of a bet is the one its chain had when it was persisted: a later change
    applies to later bets only, even when both are paid by the same flush."""
    chain = await env.chain()
    first = await _outbox_bets(env, chain, AMOUNTS)
    while await outbox.drain_once(env.redis, env.pool, env.keys, "w1", block_ms=0):
        pass
    await env.pool.execute("UPDATE users SET commission_bps = 77 WHERE user_id = $1",
                           chain.agent)
    commissions.clear_chains()
    second = bets_of(chain.players, AMOUNTS[:5])
    await env.persist(second)
    await env.settle()
    ledger, _, total, balance = await env.paid(chain.agent)
    expected = (sum(share(b["amount"], AGENT_BPS) for b in first)
                + sum(share(b["amount"], 77) for b in second))
    assert ledger == total == balance == expected


@pytest.mark.parametrize("dies", ["before_commit", "after_commit", "after_credit"])
async def test_flush_dies_at_each_step_then_the_next_pays_once(env: Env, dies: str) -> None:
    """A flusher that dies before its statement, between its commit and the Redis credit,
    or between the credit and its confirmation: the next flush (any process) completes it,
    and every (bet, ancestor) is paid exactly once, in PostgreSQL and in Redis."""
    chain = await env.chain()
    first = bets_of(chain.players, AMOUNTS)
    await env.persist(first)
    if dies != "before_commit":
        paid = await commissions.pay(env.pool, f"crashed-{uuid.uuid4().hex}")
        assert paid.bets == len(first) and paid.plan is not None
        if dies == "after_credit":
            assert await commissions.credit(env.redis, env.keys, [paid.plan]) == 3
    # ... the flusher dies here. Bets keep coming; the next flush finds both.
    second = bets_of(chain.players, AMOUNTS[::-1])
    await env.persist(second)
    report = await env.flush()
    assert report.statements == 1
    assert report.bets == (len(second) if dies != "before_commit" else len(first + second))
    assert report.plans == (1 if dies == "before_commit" else 2)
    await env.assert_paid(chain, first + second)
    again = await env.flush()  # records the credits; pays and credits nothing
    assert (again.bets, again.plans, again.ancestors_credited) == (0, 0, 0)
    await env.assert_paid(chain, first + second)
    assert await env.leftovers() == []


async def test_a_repeated_flush_pays_nothing_twice(env: Env) -> None:
    chain = await env.chain()
    bets = bets_of(chain.players, AMOUNTS)
    await env.persist(bets)
    first = await env.flush("job-7")
    assert first.bets == len(bets)
    # The same job retried, the same label: nothing is due any more.
    for _ in range(3):
        again = await env.flush("job-7")
        assert again.bets == 0 and again.paid == {}
    # A plan credited once is not credited again, even if PostgreSQL forgot it was.
    await env.pool.execute("UPDATE commission_flushes SET credited_at = NULL"
                           " WHERE flush_id LIKE 'job-7.%'")
    assert (await env.flush()).ancestors_credited == 0
    await env.settle()
    await env.assert_paid(chain, bets)
    assert await env.leftovers() == []


async def test_concurrent_flushes_pay_once(env: Env) -> None:
    chains = [await env.chain(5) for _ in range(3)]
    bets = {c.agent: bets_of(c.players, [k * 37 + 200 for k in range(60)]) for c in chains}
    await env.persist([b for bs in bets.values() for b in bs])
    reports = await asyncio.gather(*(env.flush() for _ in range(4)))
    everything = sum(share(b["amount"], bps) for c in chains for b in bets[c.agent]
                     for bps in c.ancestors.values())
    assert sum(r.paid.get("USDT", 0) for r in reports) == everything
    assert sum(r.bets for r in reports) == sum(len(b) for b in bets.values())
    await env.settle()
    for c in chains:
        await env.assert_paid(c, bets[c.agent])
    assert await env.leftovers() == []


async def test_persists_racing_flushes_lose_nothing(env: Env) -> None:
    chain = await env.chain(8)
    bets = bets_of(chain.players, [150 + k * 13 for k in range(400)])
    done = asyncio.Event()

    async def feed() -> None:
        for i in range(0, len(bets), 10):
            await env.persist(bets[i:i + 10])
            await asyncio.sleep(0)
        done.set()

    async def flushing() -> int:
        n = 0
        while not done.is_set():
            await asyncio.gather(env.flush(), env.flush())
            n += 1
        return n

    _, rounds = await asyncio.gather(feed(), flushing())
    assert rounds >= 2
    await env.settle()
    await env.assert_paid(chain, bets)
    assert await env.leftovers() == []


async def test_flushes_are_counted_for_metrics(env: Env) -> None:
    """Each flush statement and the bets it paid are added to the counters in Redis that
    the server's /metrics exports; a flush with nothing to pay adds nothing."""
    from plumbing.metrics import FLUSH_STATEMENTS, UNITS_PAID

    async def counters() -> dict[bytes, bytes]:
        return await env.redis.hgetall(env.keys.worker_stats())

    chain = await env.chain()
    assert await env.flush() and await counters() == {}
    await env.persist(bets_of(chain.players, AMOUNTS))
    first = await env.flush()
    assert first.statements == 1 and first.bets == len(AMOUNTS)
    assert await counters() == {FLUSH_STATEMENTS.encode(): b"1",
                                UNITS_PAID.encode(): str(first.bets).encode()}
    await env.persist(bets_of(chain.players, AMOUNTS))
    second = await env.flush()
    assert await counters() == {
        FLUSH_STATEMENTS.encode(): b"2",
        UNITS_PAID.encode(): str(first.bets + second.bets).encode()}
    await env.redis.delete(env.keys.worker_stats())


async def test_one_flush_per_window(env: Env) -> None:
    chain = await env.chain()
    await env.persist(bets_of(chain.players, AMOUNTS))
    first = await commissions.flush_window(env.redis, env.pool, env.keys, 0.5, "a")
    assert first is not None and first.statements == 1
    await env.persist(bets_of(chain.players, AMOUNTS))
    assert await commissions.flush_window(env.redis, env.pool, env.keys, 0.5, "b") is None
    await asyncio.sleep(0.55)
    later = await commissions.flush_window(env.redis, env.pool, env.keys, 0.5, "b")
    assert later is not None and later.statements == 1


async def test_chain_cache_reads_each_player_once_per_ttl(env: Env) -> None:
    chain = await env.chain(2)
    now = [0.0]
    cache = commissions.ChainCache(ttl_s=30, max_size=2, clock=lambda: now[0])
    got = await cache.get_many(env.pool, chain.players)
    assert got[chain.players[0]] == (
        (chain.agent, AGENT_BPS), (chain.master, MASTER_BPS), (chain.super_master, SM_BPS))
    await env.pool.execute("UPDATE users SET commission_bps = 70 WHERE user_id = $1",
                           chain.agent)
    assert (await cache.get_many(env.pool, chain.players[:1]))[chain.players[0]][0][1] == 50
    now[0] = 31.0
    assert (await cache.get_many(env.pool, chain.players[:1]))[chain.players[0]][0][1] == 70
    assert (await cache.get_many(env.pool, [chain.agent]))[chain.agent] == (
        (chain.master, MASTER_BPS), (chain.super_master, SM_BPS))
    assert len(cache._data) == 2  # bounded


# -- through the real server -----------------------------------------------------------------


def _minor(text: str) -> int:
    whole, _, frac = text.partition(".")
    return int(whole) * 100 + int((frac + "00")[:2])


async def _gather_limited(jobs: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    out: list[T] = []
    for i in range(0, len(jobs), limit):
        out += await asyncio.gather(*(job() for job in jobs[i:i + limit]))
    return out


async def view(api: Api, user_id: int) -> dict[str, Any]:
    """The admin user view, retried on a transport error: after the storm's socket phase the
    client's kept-alive connections may have idled past uvicorn's keep-alive (5 s) and be
    closed under it (a GET, so a retry is harmless)."""
    for attempt in range(3):
        try:
            return await api.user(user_id)
        except httpx.TransportError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def test_a_connected_ancestor_gets_a_commission_push(api: Api) -> None:
    sm, _ = await api.create_user("super_master", commission_bps=SM_BPS)
    m, _ = await api.create_user("master", parent_id=sm, commission_bps=MASTER_BPS)
    agent, agent_token = await api.create_user("agent", parent_id=m, commission_bps=AGENT_BPS)
    _, token = await api.player(deposit="100.00", parent_id=agent)
    async with api.play(agent_token) as watcher, api.play(token) as p:
        assert watcher.welcome["balances"]["USDT"] == "0.00"
        reply = await p.bet(amount="12.34", target="50.00")
        assert reply["type"] == "bet_result", reply
        push = await asyncio.wait_for(watcher.recv_any(), 15)
    assert push == {"type": "balance", "currency": "USDT", "reason": "commission",
                    "balance": "0.06"}  # floor(1234 x 50 / 10000) = 6
    view = await api.user(agent)
    assert view["commission_earned"]["USDT"] == "0.06" == view["balances"]["USDT"]
    assert view["commission_earned"]["BTC"] == "0.00000000"


async def test_the_storm(api: Api, settings: Settings) -> None:
    """500 players under one super master bet within the same second: after the next flush
    every ancestor has exactly its per-bet sum, paid by at most one statement per window."""
    sm, _ = await api.create_user("super_master", commission_bps=SM_BPS)
    masters = [(await api.create_user("master", parent_id=sm, commission_bps=MASTER_BPS))[0]
               for _ in range(2)]
    agents = [(await api.create_user("agent", parent_id=m, commission_bps=AGENT_BPS))[0]
              for m in masters for _ in range(5)]
    parent_of = {a: masters[k // 5] for k, a in enumerate(agents)}

    def amount(i: int) -> str:
        minor = 100 + (i * 7919) % 9900  # 1.00 ... 99.99 USDT: shares that need flooring
        return f"{minor // 100}.{minor % 100:02d}"

    def make_player(i: int) -> Callable[[], Awaitable[tuple[int, str]]]:
        return lambda: api.player(deposit="1000.00", parent_id=agents[i % len(agents)])

    players = await _gather_limited([make_player(i) for i in range(500)], 50)
    sockets: list[Player] = [api.play(token) for _, token in players]
    await _gather_limited([s.__aenter__ for s in sockets], 50)
    try:
        statements0, t0 = commissions.STATS.statements, time.monotonic()
        replies = await asyncio.gather(*(s.bet(amount=amount(i), target="50.00", id=f"s{i}")
                                         for i, s in enumerate(sockets)))
        fired_in = time.monotonic() - t0
    finally:
        await asyncio.gather(*(s.__aexit__(None, None, None) for s in sockets))
    assert all(r["type"] == "bet_result" for r in replies), replies[:3]
    assert fired_in < 1.0, fired_in

    expected: dict[int, int] = {a: 0 for a in [sm, *masters, *agents]}
    for i, reply in enumerate(replies):
        assert _minor(reply["payout"]) >= 0
        stake = _minor(amount(i))
        agent = agents[i % len(agents)]
        expected[agent] += share(stake, AGENT_BPS)
        expected[parent_of[agent]] += share(stake, MASTER_BPS)
        expected[sm] += share(stake, SM_BPS)

    async def all_paid() -> bool:
        views = await asyncio.gather(*(view(api, a) for a in expected))
        return all(_minor(v["commission_earned"]["USDT"]) == expected[v["user_id"]]
                   for v in views)

    await eventually(all_paid, within=15)
    elapsed = time.monotonic() - t0
    statements = commissions.STATS.statements - statements0
    windows = int(elapsed / settings.commission_flush_s) + 1
    assert 1 <= statements <= windows, (statements, elapsed)

    for a, total in expected.items():
        balance = (await view(api, a))["balances"]["USDT"]
        assert _minor(balance) == total, a  # Redis, credited once
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT user_id, count(*) AS n, count(DISTINCT split_part(entry_id, ':', 2)) AS w"
            " FROM ledger WHERE kind = 'commission' AND user_id = ANY($1::bigint[])"
            " GROUP BY user_id", list(expected))
        writes = await conn.fetchval(
            "SELECT count(DISTINCT split_part(entry_id, ':', 2)) FROM ledger"
            " WHERE kind = 'commission' AND user_id = ANY($1::bigint[])", list(expected))
        totals = {r["user_id"]: r["earned"] for r in await conn.fetch(
            "SELECT user_id, earned FROM commission_totals WHERE user_id = ANY($1::bigint[])"
            " AND currency = 'USDT'", list(expected))}
    finally:
        await conn.close()
    assert 1 <= writes <= statements
    assert all(r["n"] == r["w"] for r in rows)  # one row per ancestor per statement
    assert totals == expected
