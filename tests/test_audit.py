"""The audit (ops.audit) and the balance rebuild (ops.rebuild) on real servers.

The shared test database is used by every test of the session, and some of them write
rows the audit would rightly reject (test_persist's fake seed pairs). So the checks here
are scoped to users these tests created (``users=``), and the one global run uses a
database and a key prefix of its own.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import redis.asyncio as aioredis

from ops import audit, rebuild
from plumbing import heal
from plumbing.settings import Settings
from tests.conftest import (
    ADMIN_TOKEN,
    RedisServer,
    fresh_database,
    own_settings,
    serve,
)
from tests.helpers import Api, Player, keys_of, outbox_drained, play_alternating, tool

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent




async def drained(settings: Settings, redis: aioredis.Redis) -> None:
    """Wait until the server's persister has written every outbox event."""
    await outbox_drained(redis, keys_of(settings))


async def audited(settings: Settings, users: list[int] | None) -> audit.Audit:
    """Audit until it passes (commissions may still be on their way), or the last result."""
    result = await audit.run(settings, users, retries=0)
    deadline = time.monotonic() + 10.0
    while not result.ok and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        result = await audit.run(settings, users, retries=0)
    return result


async def population(api: Api) -> list[int]:
    """An agent chain with commission rates, two players, deposits and bets in two
    currencies. Returns every user id created."""
    master, _ = await api.create_user("master", commission_bps=30)
    agent, _ = await api.create_user("agent", parent_id=master, commission_bps=50)
    p1, t1 = await api.player(deposit="100.00", parent_id=agent)
    p2, t2 = await api.player(deposit="50.00")
    await api.deposit(p1, "0.01000000", "BTC")
    await play_alternating(api, t1, 12)
    await play_alternating(api, t1, 5, "BTC", "0.00010000")
    await play_alternating(api, t2, 8, amount="2.50")
    await api.deposit(p2, "7.77")
    return [master, agent, p1, p2]


def failures_of(result: audit.Audit, check: str) -> list[str]:
    return [str(f) for f in result.failures if f.check == check]


# -- pure checks -------------------------------------------------------------------------------


def _pair() -> audit.PairRow:
    from games import seeds

    ss = "a" * 64
    return audit.PairRow(7, 1, ss, seeds.server_seed_hash(ss), "client", None)


def _bet(pair: audit.PairRow, nonce: int, **changes: Any) -> audit.StoredBet:
    from games import dice

    roll = dice.roll(pair.server_seed, pair.client_seed, nonce)
    mult = dice.multiplier_bp(5000)
    payout = dice.payout(dice.Minor(100), mult) if roll < 5000 else 0
    fields: dict[str, Any] = dict(
        bet_id=f"{pair.pair_id}-{nonce}", user_id=1, pair_id=pair.pair_id, currency="USDT",
        amount=100, payout=payout, roll=roll, target=5000, direction="under", nonce=nonce,
        multiplier=mult, server_seed_hash=pair.server_seed_hash, client_seed=pair.client_seed,
        ledger_user=1, ledger_currency="USDT", ledger_delta=payout - 100,
    )
    fields.update(changes)
    return audit.StoredBet(**fields)


def test_pure_bet_checks() -> None:
    pair = _pair()
    assert audit.check_pair(pair) == []
    assert audit.check_pair(audit.PairRow(7, 1, "b" * 64, pair.server_seed_hash, "c"))
    good = _bet(pair, 3)
    assert audit.check_bet(good, pair, 100) == []
    assert "roll" in str(audit.check_bet(_bet(pair, 3, roll=(good.roll + 1) % 10001), pair,
                                         100)[0])
    assert any("payout" in str(f) for f in audit.check_bet(
        _bet(pair, 3, payout=good.payout + 1, ledger_delta=good.payout - 99), pair, 100))
    assert any("multiplier" in str(f) for f in audit.check_bet(good, pair, 200))
    assert any("no ledger row" in str(f)
               for f in audit.check_bet(_bet(pair, 3, ledger_delta=None), pair, 100))
    assert "does not exist" in str(audit.check_bet(good, None, 100)[0])
    revealed = audit.PairRow(7, 1, pair.server_seed, pair.server_seed_hash, "client", 2)
    assert "final nonce" in str(audit.check_bet(good, revealed, 100)[0])
    tracker = audit.NonceTracker()
    assert tracker.feed(good) is None
    assert tracker.feed(_bet(pair, 4)) is None
    twice = tracker.feed(_bet(pair, 4, bet_id="other"))
    assert twice is not None and "two bets" in str(twice)


def test_pure_money_checks() -> None:
    pending = {(1, "USDT"): -50}
    assert audit.compare_balances(1, {"USDT": 1000}, {"USDT": 950}, pending) == []
    off = audit.compare_balances(1, {"USDT": 1000}, {"USDT": 951}, pending)
    assert len(off) == 1 and "off by +1" in str(off[0])
    assert audit.compare_balances(2, {"BTC": 5}, {}, {})  # missing in Redis
    t = audit.Totals(deposits=1000, balances=930, commissions=5, stakes=300, payouts=225)
    assert t.house == 70 and t.gap == 0
    assert audit.check_conservation("pg", {"USDT": t}) == []
    t.balances += 1
    assert "-1 unaccounted" in str(audit.check_conservation("pg", {"USDT": t})[0])


# -- against the shared server -----------------------------------------------------------------


async def test_audit_passes_then_names_tampering(
    api: Api, settings: Settings, redis: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    users = await population(api)
    await drained(settings, redis)
    result = await audited(settings, users)
    assert result.ok, audit.summary(result)
    assert result.bets.bets == 25 and result.money.users >= 3

    # One minor unit appears in Redis from nowhere.
    player = users[2]
    key = keys_of(settings).balances(player)
    await redis.hincrby(key, "USDT", 1)
    try:
        bad = await audit.run(settings, users, retries=0)
        assert not bad.ok
        assert any(f"user {player} USDT" in f and "off by +1" in f
                   for f in failures_of(bad, "balances")), audit.summary(bad)
        assert any("USDT (Redis" in f for f in failures_of(bad, "conservation"))
        assert not any("PostgreSQL" in f for f in failures_of(bad, "conservation"))
    finally:
        await redis.hincrby(key, "USDT", -1)

    # A stored payout changed in PostgreSQL (restored afterwards).
    bet_id, payout = await pool.fetchrow(
        "SELECT bet_id, payout FROM bets WHERE user_id = $1 ORDER BY nonce LIMIT 1", player)
    await pool.execute("UPDATE bets SET payout = payout + 100 WHERE bet_id = $1", bet_id)
    try:
        bad = await audit.run(settings, users, retries=0)
        found = failures_of(bad, "bets")
        assert any(f"bet {bet_id}" in f and "recomputed" in f for f in found), found
        assert failures_of(bad, "conservation")  # stakes - payouts no longer match the ledger
    finally:
        await pool.execute("UPDATE bets SET payout = $2 WHERE bet_id = $1", bet_id, payout)

    # A commitment that does not match its seed, and a nonce used twice.
    pair_id, seed_hash = await pool.fetchrow(
        "SELECT pair_id, server_seed_hash FROM seed_pairs WHERE user_id = $1 LIMIT 1", player)
    row = await pool.fetchrow("SELECT * FROM bets WHERE bet_id = $1", bet_id)
    await pool.execute("UPDATE seed_pairs SET server_seed_hash = $2 WHERE pair_id = $1",
                       pair_id, "0" * 64)
    await pool.execute(
        "INSERT INTO bets (bet_id, user_id, pair_id, currency, amount, payout, roll, target,"
        " direction, nonce, multiplier, server_seed_hash, client_seed, balance_after,"
        " created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,"
        " $15)", "dup-" + bet_id, *[row[c] for c in (
            "user_id", "pair_id", "currency", "amount", "payout", "roll", "target",
            "direction", "nonce", "multiplier", "server_seed_hash", "client_seed",
            "balance_after", "created_at")])
    try:
        bad = await audit.run(settings, users, retries=0)
        assert any(f"pair {pair_id}" in f and "SHA256" in f
                   for f in failures_of(bad, "pairs")), audit.summary(bad)
        assert any("used by two bets" in f for f in failures_of(bad, "bets"))
    finally:
        await pool.execute("DELETE FROM bets WHERE bet_id = $1", "dup-" + bet_id)
        await pool.execute("UPDATE seed_pairs SET server_seed_hash = $2 WHERE pair_id = $1",
                           pair_id, seed_hash)
    assert (await audit.run(settings, users, retries=0)).ok


async def test_bets_told_but_not_held_are_named_and_counted(
    api: Api, settings: Settings, redis: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    """A bet the player was shown that neither store holds (here: removed from PostgreSQL
    with its ledger row, as if Redis lost it before it was persisted): the nonce gap below
    the pair's top names it; the balance check names the same money."""
    users = await population(api)
    await drained(settings, redis)
    player = users[2]
    row = await pool.fetchrow(
        "SELECT * FROM bets WHERE user_id = $1 ORDER BY nonce LIMIT 1", player)
    ledger = await pool.fetchrow("SELECT * FROM ledger WHERE entry_id = $1",
                                 "bet:" + row["bet_id"])
    await pool.execute("DELETE FROM ledger WHERE entry_id = $1", ledger["entry_id"])
    await pool.execute("DELETE FROM bets WHERE bet_id = $1", row["bet_id"])
    try:
        bad = await audit.run(settings, users, retries=0)
        told = failures_of(bad, "told")
        assert len(told) == 1 and f"pair {row['pair_id']} (user {player})" in told[0], told
        assert bad.money.told_not_held == 1
        assert "told, not held    1 bets" in audit.summary(bad)
    finally:
        cols = list(row.keys())
        await pool.execute(
            f"INSERT INTO bets ({', '.join(cols)})"
            f" VALUES ({', '.join(f'${i + 1}' for i in range(len(cols)))})", *row.values())
        await pool.execute(
            "INSERT INTO ledger (entry_id, user_id, currency, delta, kind, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)", *[ledger[c] for c in (
                "entry_id", "user_id", "currency", "delta", "kind", "created_at")])
    good = await audit.run(settings, users, retries=0)
    assert good.ok and good.money.told_not_held == 0, audit.summary(good)


async def test_pending_outbox_counts_as_pending_not_lost(
    api: Api, settings: Settings, redis: aioredis.Redis
) -> None:
    """An event in the outbox that the ledger does not have yet (here: one of our own,
    appended to a prefix no persister drains) is pending, and balances still agree."""
    uid, token = await api.player(deposit="10.00")
    await play_alternating(api, token, 3)
    await drained(settings, redis)
    own = settings.model_copy(update={"key_prefix": f"a{uuid.uuid4().hex[:6]}"})
    keys = keys_of(own)
    import msgpack

    await redis.hset(keys.balances(uid), "USDT", 500)
    await heal.mark_new(redis, keys, uid)  # its hash under this prefix is its balance
    await redis.xadd(keys.outbox_for(uid), {
        "k": "deposit", "b": "500",
        "e": msgpack.packb({"key": uuid.uuid4().hex, "user_id": uid, "currency": "USDT",
                            "amount": 500, "ts": 0}),
    })
    result = await audit.run(own, [uid], retries=0)
    # The ledger (shared database) has the player's real money, our prefix's Redis only the
    # pending deposit: the balance check must say exactly that difference.
    pending = result.money.pending
    assert pending.deposits == 1 and pending.deposited == {"USDT": 500}
    assert any(f"user {uid} USDT" in str(f) and "pending 500" in str(f)
               for f in result.failures)


async def test_rebuild_restores_a_deleted_balance_exactly(
    api: Api, settings: Settings, redis: aioredis.Redis
) -> None:
    uid, token = await api.player(deposit="20.00")
    await api.deposit(uid, "0.00500000", "BTC")
    await play_alternating(api, token, 6)
    await play_alternating(api, token, 2, "BTC", "0.00001000")
    await drained(settings, redis)
    keys = keys_of(settings)
    before = await redis.hgetall(keys.balances(uid))
    assert before
    await redis.delete(keys.balances(uid))
    bad = await audit.run(settings, [uid], retries=0)
    assert any("Redis 0" in f for f in failures_of(bad, "balances")), audit.summary(bad)

    done = await rebuild.run(settings, [uid])
    assert await redis.hgetall(keys.balances(uid)) == before
    assert done.balances[uid] == {k.decode(): int(v) for k, v in before.items()}
    assert (await audit.run(settings, [uid], retries=0)).ok


async def test_rebuild_refuses_while_events_are_unpersisted(
    settings: Settings, redis: aioredis.Redis
) -> None:
    own = settings.model_copy(update={"key_prefix": f"r{uuid.uuid4().hex[:6]}"})
    keys = keys_of(own)
    await redis.xadd(keys.outbox(0), {"k": "deposit", "e": b"x"})
    with pytest.raises(rebuild.Refused, match="1 outbox event"):
        await rebuild.run(own, [])
    proc = await asyncio.to_thread(tool, own, "ops.rebuild")
    assert proc.returncode == 1 and "refused" in proc.stderr
    assert (await rebuild.run(own, [], force=True)).balances == {}
    await redis.delete(keys.outbox(0))


async def test_commissions_in_flight_are_pending_not_missing(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A stored bet not yet paid, then paid in PostgreSQL, then credited in Redis: the audit
    holds at every step; then every commission is recomputed from the bets, so a ledger row,
    a total or a recorded rate that disagrees is named (on a database of its own: a flush
    pays every due bet of its database)."""
    from workers import commissions

    async with fresh_database(settings.database_url) as dsn:
        own = settings.model_copy(update={"key_prefix": f"c{uuid.uuid4().hex[:6]}",
                                          "database_url": dsn})
        keys = keys_of(own)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            agent = await pool.fetchval(
                "INSERT INTO users (role, commission_bps, name, token_hash)"
                " VALUES ('agent', 100, 'a', 'x') RETURNING user_id")
            player = await pool.fetchval(
                "INSERT INTO users (role, parent_id, name, token_hash)"
                " VALUES ('player', $1, 'p', 'y') RETURNING user_id", agent)
            await pool.execute(
                "INSERT INTO bets (bet_id, user_id, pair_id, currency, amount, payout, roll,"
                " target, direction, nonce, multiplier, server_seed_hash, client_seed,"
                " balance_after, created_at, commission_to, commission_bps)"
                " VALUES ('1-1', $1, 1, 'USDT', 799, 0, 9000, 5000, 'under', 1, 19800, 'h',"
                " 'c', 0, now(), $2, '{100}')", player, [agent])
            due = await audit.run(own, [agent], retries=0)
            assert due.ok, audit.summary(due)
            assert due.money.pending.commissions == {"USDT": 7}  # floor(799 x 100 / 10000)
            assert due.money.pending.due_bets == 1

            paid = await commissions.pay(pool, "audit-test")
            assert paid.plan == commissions.Plan("audit-test", {(agent, "USDT"): 7})
            held = await audit.run(own, [agent], retries=0)  # the ledger has it, Redis not yet
            assert held.ok, audit.summary(held)
            assert held.money.pending.uncredited == {(agent, "USDT"): 7}
            assert held.money.pg["USDT"].commissions == 7

            # The ledger already holds this credit: a rebuild from it marks it as made, so
            # the flush does not add it a second time.
            rebuilt = await rebuild.run(own, [agent])
            assert rebuilt.balances[agent] == {"USDT": 7}
            assert await redis.exists(keys.credit_marker("audit-test", agent))
            assert await commissions.credit(redis, keys, [paid.plan]) == 0
            done = await audit.run(own, [agent], retries=0)
            assert done.ok and not done.money.pending.uncredited
            assert done.money.redis["USDT"].balances == 7

            # A credit that never reached the balance (marker set, money missing) is named.
            await redis.hincrby(keys.balances(agent), "USDT", -7)
            bad = await audit.run(own, [agent], retries=0)
            assert any(f"user {agent} USDT" in f for f in failures_of(bad, "balances"))
            await redis.hincrby(keys.balances(agent), "USDT", 7)
            await pool.execute("UPDATE commission_totals SET earned = earned + 1"
                               " WHERE user_id = $1", agent)
            bad = await audit.run(own, [agent], retries=0)
            assert any("commission_totals 8, ledger 7" in f
                       for f in failures_of(bad, "commissions"))
            await pool.execute("UPDATE commission_totals SET earned = earned - 1"
                               " WHERE user_id = $1", agent)
            # The flush's own figures are not trusted: the bets say what is owed.
            await pool.execute("UPDATE bets SET commission_bps = '{200}' WHERE bet_id = '1-1'")
            bad = await audit.run(own, [agent], retries=0)
            assert [f for f in failures_of(bad, "commissions")] == [
                f"[commissions] flush audit-test user {agent} USDT: the bets it paid owe 15,"
                " the ledger holds 7"], audit.summary(bad)
            await pool.execute("UPDATE bets SET commission_bps = '{100}' WHERE bet_id = '1-1'")
            assert (await audit.run(own, [agent], retries=0)).ok
            # A flush PostgreSQL paid long ago and Redis never took: named, not retried.
            await pool.execute("UPDATE commission_flushes SET credited_at = NULL,"
                               " created_at = now() - interval '30 days'")
            await redis.delete(keys.credit_marker("audit-test", agent))
            bad = await audit.run(own, [agent], retries=0)
            assert any("never credited" in f for f in failures_of(bad, "commissions"))
            assert (await commissions.flush(redis, pool, keys)).plans == 0
        finally:
            await pool.close()


# -- a system of its own: the global run and Redis losing writes -----------------------------


async def test_global_audit_of_a_whole_system(
    redis_server: RedisServer, own_database: str, redis: aioredis.Redis
) -> None:
    settings = own_settings(redis_server.url, own_database)
    async with serve(settings) as served, Api(served.address, ADMIN_TOKEN) as api:
        users = await population(api)
        await play_alternating(api, (await api.player(deposit="3.00"))[1], 3)
        await drained(settings, redis)
        result = await audited(settings, None)
        assert result.ok, audit.summary(result)
        assert result.bets.bets == 28 and result.money.users >= 3

    def cli() -> subprocess.CompletedProcess[str]:
        return tool(settings, "ops.audit", "--retries", "0")

    ok = await asyncio.to_thread(cli)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "AUDIT OK" in ok.stdout and "bets checked      28" in ok.stdout
    await redis.hincrby(keys_of(settings).balances(users[3]), "USDT", -2)
    bad = await asyncio.to_thread(cli)
    assert bad.returncode == 1
    assert f"user {users[3]} USDT: Redis" in bad.stdout and "off by -2" in bad.stdout


async def _bet_until_result(p: Player, unasked: list[dict[str, Any]]) -> dict[str, Any]:
    """Bet, resending while the server answers UNAVAILABLE (Redis is coming back). Unasked
    frames (a ``seed_rotated`` push) go to ``unasked``."""
    r = await p.settle({"type": "bet", "id": f"after-restart-{uuid.uuid4().hex}",
                        "currency": "USDT", "amount": "1.00", "target": "50.00",
                        "direction": "under"}, unasked)
    assert r["type"] == "bet_result", r
    return r


async def _lose_writes(redis_server: RedisServer, snapshot: Path) -> None:
    """Kill Redis and start it again from an older copy of its data directory."""
    redis_server.stop(kill=True)
    shutil.rmtree(redis_server.dir)
    shutil.copytree(snapshot, redis_server.dir)
    redis_server.start()


async def test_redis_losing_writes_is_found_and_rebuilt(
    aof_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """Redis restarts from an older AOF: the user's Redis hash is behind the ledger, but
    stale (Redis restarted since its last heal): the audit counts the user as awaiting its
    heal, not as a mismatch, and the user's next action heals it; the rebuild (servers
    stopped) still agrees with the ledger afterwards."""
    settings = own_settings(aof_redis.url, database_url)
    client = aioredis.Redis.from_url(settings.redis_url)
    async with serve(settings) as served, Api(served.address, ADMIN_TOKEN) as api:
        uid, token = await api.player(deposit="40.00")
        await play_alternating(api, token, 3)
        await drained(settings, client)
        shutil.copytree(aof_redis.dir, tmp_path / "old")
        await play_alternating(api, token, 4)
        await api.deposit(uid, "1.00")
        await drained(settings, client)  # PostgreSQL has all of it
        await client.aclose()
        await _lose_writes(aof_redis, tmp_path / "old")
        client = aioredis.Redis.from_url(settings.redis_url)
        stale = await audit.run(settings, [uid], retries=0)
        assert stale.ok and stale.money.awaiting_heal == 1, audit.summary(stale)
        conn = await asyncpg.connect(settings.database_url)
        ledger = await conn.fetchval("SELECT sum(delta) FROM ledger WHERE user_id = $1"
                                     " AND currency = 'USDT'", uid)
        await conn.close()
        behind = int(await client.hget(keys_of(settings).balances(uid), "USDT") or 0)
        assert behind != ledger  # the old copy lost four bets and a deposit
        await api.user(uid)  # anything that reads or moves the money heals it
        healed = int(await client.hget(keys_of(settings).balances(uid), "USDT") or 0)
        assert healed == ledger
        done_audit = await audit.run(settings, [uid], retries=0)
        assert done_audit.ok and done_audit.money.awaiting_heal == 0, \
            audit.summary(done_audit)
    try:
        # The old copy's outbox may still hold entries persisted long ago: already in the
        # ledger, so they count once. Nothing unpersisted is left: the rebuild may run.
        done = await rebuild.run(settings, [uid], force=True)
        assert done.balances[uid]["USDT"] == int(await client.hget(
            keys_of(settings).balances(uid), "USDT") or 0)
        good = await audit.run(settings, [uid], retries=0)
        assert good.ok, audit.summary(good)
    finally:
        await client.aclose()


async def test_redis_restart_that_lost_writes_rotates_every_seed_pair(
    aof_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """After Redis comes back from a restart that lost writes, every active seed pair is
    rotated before the next bet: a nonce whose roll a player already saw is never reused."""
    settings = own_settings(aof_redis.url, database_url)
    async with serve(settings) as served, Api(served.address, ADMIN_TOKEN) as api:
        _, token = await api.player(deposit="50.00")
        seen: set[tuple[str, int]] = set()
        async with api.play(token) as p:
            for _ in range(3):
                r = await p.bet()
                seen.add((r["server_seed_hash"], r["nonce"]))
            old_hash = r["server_seed_hash"]
            client = aioredis.Redis.from_url(settings.redis_url)
            try:  # the three bets persisted: the copy has no outbox entry of them
                await drained(settings, client)
            finally:
                await client.aclose()
            shutil.copytree(aof_redis.dir, tmp_path / "old")  # the pair at nonce 3
            for _ in range(3):
                r = await p.bet()
                seen.add((r["server_seed_hash"], r["nonce"]))
            assert (r["server_seed_hash"], r["nonce"]) == (old_hash, 6)
            await _lose_writes(aof_redis, tmp_path / "old")  # Redis is back at nonce 3

            # The same socket bets again: its cached pair is stale.
            unasked: list[dict[str, Any]] = []
            after = await _bet_until_result(p, unasked)
            assert (after["server_seed_hash"], after["nonce"]) not in seen
            assert after["server_seed_hash"] != old_hash and after["nonce"] == 1
        # A new socket sees the new pair too, and so does its next bet.
        async with api.play(token) as q:
            assert q.welcome["seed"]["server_seed_hash"] == after["server_seed_hash"]
            again = await _bet_until_result(q, [])
            assert (again["server_seed_hash"], again["nonce"]) == (
                after["server_seed_hash"], 2)

