"""The heal (plumbing/heal.py, lua/heal-n.lua) on the session's server, Redis and database.

A lost heal marker stands for a Redis restart: every money script of the user refuses
(HEAL) until the user has been made equal to the ledger again."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

import asyncpg
import redis.asyncio as aioredis

from games.codes import BetCode
from plumbing import heal, scripts
from plumbing.keys import Keys
from plumbing.redisclient import open_client
from plumbing.settings import Settings
from tests.helpers import Api, eventually, keys_of
from tests.rediscluster import command

if TYPE_CHECKING:
    from tests.rediscluster import RedisCluster


async def ledger_usdt(pool: asyncpg.Pool, uid: int) -> int:
    return int(await pool.fetchval(
        "SELECT coalesce(sum(delta), 0) FROM ledger WHERE user_id = $1 AND currency = 'USDT'",
        uid))


async def test_a_deposit_both_stores_lost_is_credited_once_by_the_admins_retry(
    api: Api, settings: Settings, redis: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    """The deposits row was written, then Redis lost the credit (or the admin request died
    between the two): the retry with the same key heals the user, which credits it, and
    answers the replay; a second retry changes nothing."""
    uid, _ = await api.player()
    key = f"lost-{uuid.uuid4().hex}"
    await pool.execute("INSERT INTO deposits (idempotency_key, user_id, currency, amount)"
                       " VALUES ($1, $2, 'USDT', 700)", key, uid)
    await redis.delete(keys_of(settings).healed(uid))  # Redis restarted since
    body = {"user_id": uid, "currency": "USDT", "amount": "7.00", "idempotency_key": key}
    for _ in range(2):
        r = await api.http.post("/api/admin/deposits", json=body)
        assert r.status_code == 200 and r.json()["balance"] == "7.00", r.text
    assert (await api.user(uid))["balances"]["USDT"] == "7.00"

    async def in_ledger() -> bool:
        return await ledger_usdt(pool, uid) == 700

    await eventually(in_ledger)


async def test_a_deposit_both_stores_lost_is_credited_once_by_the_next_bet(
    api: Api, settings: Settings, redis: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    uid, token = await api.player(deposit="3.00")
    key = f"lost-{uuid.uuid4().hex}"
    await pool.execute("INSERT INTO deposits (idempotency_key, user_id, currency, amount)"
                       " VALUES ($1, $2, 'USDT', 500)", key, uid)
    await redis.delete(keys_of(settings).healed(uid))
    async with api.play(token) as p:
        r = await p.bet(amount="1.00", id="after")
        assert r["type"] == "bet_result", r
        payout = int(r["payout"].replace(".", ""))
        assert r["balance"] == f"{(800 - 100 + payout) / 100:.2f}"
    body = {"user_id": uid, "currency": "USDT", "amount": "5.00", "idempotency_key": key}
    r2 = await api.http.post("/api/admin/deposits", json=body)
    assert r2.status_code == 200, r2.text  # a replay: no second credit
    assert (await api.user(uid))["balances"]["USDT"] == r["balance"]


async def test_a_resent_bet_is_answered_from_postgresql_after_redis_forgot_it(
    api: Api, settings: Settings, redis: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    """Redis forgot the bet (record, balance change, nonce): the resend is answered with
    the original result from the stored row, and the balance is the ledger's."""
    uid, token = await api.player(deposit="10.00")
    k = keys_of(settings)
    async with api.play(token) as p:
        first = await p.bet(amount="2.00", id="keep-me")

        async def stored() -> bool:
            return await pool.fetchval(
                "SELECT client_id FROM bets WHERE bet_id = $1", first["bet_id"]) == "s:keep-me"

        await eventually(stored)
        await redis.delete(k.bet_idem(uid, "keep-me"), k.healed(uid))
        await redis.hset(k.balances(uid), "USDT", 1000)  # as before the bet
        again = await p.bet(amount="2.00", id="keep-me")
    assert {n: again[n] for n in ("bet_id", "roll", "nonce", "payout", "balance")} == \
        {n: first[n] for n in ("bet_id", "roll", "nonce", "payout", "balance")}
    assert int(await redis.hget(k.balances(uid), "USDT")) == await ledger_usdt(pool, uid)
    assert await pool.fetchval("SELECT count(*) FROM bets WHERE user_id = $1", uid) == 1


async def test_two_heals_at_once_compute_one_truth(
    api: Api, settings: Settings, redis: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    uid, _ = await api.player(deposit="4.00")
    k = keys_of(settings)

    async def persisted() -> bool:
        return await ledger_usdt(pool, uid) == 400

    await eventually(persisted)
    await redis.delete(k.healed(uid))
    await redis.hset(k.balances(uid), "USDT", 1)
    done = await asyncio.gather(*(heal.heal(redis, pool, k, uid) for _ in range(4)))
    assert sorted(done) == [False, False, False, True]
    assert await redis.hget(k.balances(uid), "USDT") == b"400"
    assert await heal.is_healed(redis, k, uid)


async def test_a_stale_user_changes_nothing_until_healed(
    api: Api, settings: Settings, redis: aioredis.Redis
) -> None:
    """bet-n refuses with HEAL and moves nothing while the marker is not the run id."""
    uid, _ = await api.player(deposit="4.00")
    k = keys_of(settings)
    await redis.set(k.healed(uid), "another-run")
    rid = await heal.run_id(redis, k, uid)
    before = await redis.hgetall(k.balances(uid))
    reply = await scripts.run_one(
        redis, scripts.BET,
        [k.balances(uid), k.seed(uid), k.outbox_for(uid), k.user_channel(uid), k.healed(uid),
         k.bet_idem(uid, "x")],
        ["1", rid, "60000", "0", "USDT", "100", "-100", "0", "USDT|100|5000|under", b"e", "-"])
    assert reply == [[BetCode.HEAL]]
    assert await redis.hgetall(k.balances(uid)) == before
    assert not await redis.exists(k.bet_idem(uid, "x"))


async def test_a_pair_only_the_lost_history_knew_is_revealed_at_the_rotation(
    api: Api, settings: Settings, redis: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    """A rotation Redis forgot leaves a pair PostgreSQL holds unrevealed, with bets on it:
    the rotation forced by the restart (EPOCH) reveals it, at the highest nonce PostgreSQL
    holds, so those bets can be verified. A pair younger than ORPHAN_AFTER_S (it may be
    another instance's rotation in flight) is left alone, and so is the new active one."""
    uid, token = await api.player(deposit="5.00")
    async with api.play(token) as p:
        first = await p.bet("0.10")
        assert first["type"] == "bet_result", first
        old_pid = int(first["bet_id"].split("-")[0])
        orphan = await pool.fetchval(
            "INSERT INTO seed_pairs (user_id, server_seed, server_seed_hash, client_seed,"
            " created_at) VALUES ($1, 'lost', 'h', 'c', now() - interval '5 minutes')"
            " RETURNING pair_id", uid)
        await pool.execute(
            "INSERT INTO bets (bet_id, user_id, pair_id, currency, amount, payout, roll,"
            " target, direction, nonce, multiplier, server_seed_hash, client_seed,"
            " balance_after, created_at) VALUES ($1, $2, $3, 'USDT', 10, 0, 9000, 5000,"
            " 'under', 4, 19800, 'h', 'c', 0, now())", f"{orphan}-4", uid, orphan)
        young = await pool.fetchval(
            "INSERT INTO seed_pairs (user_id, server_seed, server_seed_hash, client_seed)"
            " VALUES ($1, 'fresh', 'h', 'c') RETURNING pair_id", uid)
        # Redis restarted since the active pair was installed: its next bet rotates it.
        await redis.hset(keys_of(settings).seed(uid), "rid", "an-earlier-run")
        rotated = await p.bet("0.10")  # the unasked seed_rotated comes first
        assert rotated["type"] == "seed_rotated", rotated
        second = await p.recv()
        assert second["type"] == "bet_result", second
        new_pid = int(second["bet_id"].split("-")[0])
        assert new_pid not in (old_pid, orphan, young) and second["nonce"] == 1
    rows = {r["pair_id"]: r for r in await pool.fetch(
        "SELECT pair_id, revealed_at, final_nonce FROM seed_pairs WHERE user_id = $1", uid)}
    assert rows[orphan]["revealed_at"] is not None and rows[orphan]["final_nonce"] == 4
    assert rows[old_pid]["revealed_at"] is not None  # the rotation itself
    assert rows[young]["revealed_at"] is None
    assert rows[new_pid]["revealed_at"] is None


async def test_the_run_id_is_the_one_of_the_users_master_even_after_a_failover(
    redis_cluster: RedisCluster,
) -> None:
    """On a cluster a user's run id is its own master's, and right after a failover the
    promoted replica's, although the client's slot map still names the old master."""
    client = await open_client(redis_cluster.url)
    keys = Keys(f"r{uuid.uuid4().hex[:6]}", 16)
    by_port = {node.port: node for node in redis_cluster.nodes}
    try:
        users = range(1, 40)
        owners = {u: client.get_node_from_key(keys.healed(u)) for u in users}  # type: ignore[union-attr]
        assert len({node.port for node in owners.values()}) == 3  # users on every master
        for user, node in owners.items():
            assert await heal.run_id(client, keys, user) == by_port[node.port].run_id()
        user = 1
        old = by_port[owners[user].port]
        replica = redis_cluster.replica_of(old)
        await asyncio.to_thread(command, replica.port, "CLUSTER", "FAILOVER")
        await eventually(lambda: asyncio.to_thread(redis_cluster.is_master, replica), within=30)
        # The client has not met a MOVED yet: its map still names the old master.
        assert client.get_node_from_key(keys.healed(user)).port == old.port  # type: ignore[union-attr]
        assert await heal.run_id(client, keys, user) == replica.run_id()
    finally:
        await client.aclose()
        await asyncio.to_thread(redis_cluster.wait_ok, time.monotonic() + 60)
