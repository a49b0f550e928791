"""server/redisrouter.py on a real Redis Cluster (tests/rediscluster.py): cluster mode is
detected, bets of users on every master settle in one batch and replay when resent, no
call meets CROSSSLOT or an unfollowed MOVED, and a manual failover under load costs at
most a few unconfirmed calls (answered after a resend), a NOSCRIPT (Redis 7 does not
replicate the script cache: the scripts are loaded again, as the server does) and an
EPOCH for the failed-over shard's pairs, never a lost or doubled stake."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from redis.cluster import RedisCluster as SyncCluster
from redis.exceptions import NoScriptError, RedisError

from games.codes import BetCode
from plumbing import scripts
from plumbing.keys import Keys
from server.redisconn import RUN_ID
from server.redisrouter import ClusterConnection, cluster_enabled, slot_of
from server.resp import Command
from tests.conftest import RedisServer
from tests.helpers import eventually
from tests.rediscluster import RedisCluster, command

START = 1_000_000
STAKE = 100


@pytest.fixture
def sync(redis_cluster: RedisCluster) -> Iterator[SyncCluster]:
    c = SyncCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    yield c
    c.close()


@pytest_asyncio.fixture
async def conn(redis_cluster: RedisCluster) -> AsyncIterator[ClusterConnection]:
    c = ClusterConnection(redis_cluster.nodes[-1].url, read_timeout=2.0)
    await c.connect()
    await c.execute([("SCRIPT", "LOAD", scripts.BET.source)])
    yield c
    await c.close()


def run_id_of(sync: SyncCluster, key: str) -> str:
    node = sync.get_node_from_key(key)
    info = sync.get_redis_connection(node).info("server")
    return str(info["run_id"])


def users_on_every_master(sync: SyncCluster, keys: Keys, per_master: int) -> list[int]:
    chosen: dict[str, list[int]] = {}
    for uid in range(1, 10_000):
        owner = sync.get_node_from_key(keys.balances(uid)).name
        if len(chosen.setdefault(owner, [])) < per_master:
            chosen[owner].append(uid)
        if len(chosen) == 3 and all(len(v) == per_master for v in chosen.values()):
            break
    assert len(chosen) == 3
    return [u for us in chosen.values() for u in us]


def fund(sync: SyncCluster, keys: Keys, uid: int) -> None:
    sync.hset(keys.balances(uid), "USDT", str(START))
    sync.hset(keys.seed(uid), mapping={"pid": "1", "ss": "s", "sh": "h", "cs": "c", "n": "0",
                                       "rid": run_id_of(sync, keys.seed(uid))})


def bet(keys: Keys, uid: int, nonce: int) -> Command:
    """Bet ``nonce + 1`` of ``uid`` (a loss of STAKE), as the wallet builds it: RUN_ID in
    ARGV[2] for the connection to fill in per node."""
    return ("EVALSHA", scripts.BET.sha, 5, keys.balances(uid), keys.seed(uid),
            keys.outbox_for(uid), keys.user_channel(uid), keys.bet_idem(uid, nonce + 1),
            "1", RUN_ID, "300000", "0",
            "USDT", str(STAKE), str(-STAKE), str(nonce), f"USDT|{STAKE}|5000|under", b"ev",
            "test:1")


async def send_batch(conn: ClusterConnection, commands: list[Command]) -> list[Any]:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in commands]

    def on_reply(i: int, reply: Any) -> None:
        futures[i].set_result(reply)

    conn.send_now(commands, on_reply)
    return list(await asyncio.gather(*futures))


async def test_cluster_mode_is_detected(
    redis_cluster: RedisCluster, redis_server: RedisServer
) -> None:
    assert await cluster_enabled(redis_cluster.nodes[1].url)
    assert not await cluster_enabled(redis_server.url)


async def test_bets_on_every_master_settle_in_one_batch_and_replay(
    conn: ClusterConnection, sync: SyncCluster
) -> None:
    keys = Keys("rt1", 64)
    users = users_on_every_master(sync, keys, 4)
    for uid in users:
        fund(sync, keys, uid)
    assert conn.ready_run_id() is RUN_ID
    batch = [bet(keys, uid, 0) for uid in users]
    assert len({slot_of(c) for c in batch}) > 3
    first = await send_batch(conn, batch)
    assert [r[0][:3] for r in first] == [[BetCode.SETTLED, str(START - STAKE).encode(), 1]] * len(
        users)
    again = await send_batch(conn, batch)
    assert [r[0][0] for r in again] == [BetCode.REPLAY] * len(users)
    for uid in users:
        assert sync.hget(keys.balances(uid), "USDT") == str(START - STAKE).encode()
    assert conn.moved == conn.asked == 0  # the map was right: nothing redirected


async def test_a_failover_under_load_loses_and_doubles_nothing(
    conn: ClusterConnection, sync: SyncCluster, redis_cluster: RedisCluster
) -> None:
    keys = Keys("rt2", 64)
    users = users_on_every_master(sync, keys, 2)
    for uid in users:
        fund(sync, keys, uid)
    by_port = {n.port: n for n in redis_cluster.nodes}
    old = by_port[sync.get_node_from_key(keys.balances(users[0])).port]
    replica = redis_cluster.replica_of(old)
    confirmed = dict.fromkeys(users, 0)
    epochs: dict[int, int] = dict.fromkeys(users, 0)
    failed_over_at: float | None = None
    after: dict[int, int] = dict.fromkeys(users, 0)
    last: dict[int, Any] = {}

    async def player(uid: int) -> None:
        deadline = time.monotonic() + 60
        while failed_over_at is None or after[uid] < 5:
            assert time.monotonic() < deadline, f"no bets after the failover: {last[uid]!r}"
            try:
                if conn.ready_run_id() is None:
                    await conn.connect()
                (reply,) = await send_batch(conn, [bet(keys, uid, confirmed[uid])])
            except RedisError:  # not connected yet: the client resends, as on UNAVAILABLE
                reply = RedisError("not sent")
            last[uid] = reply
            if isinstance(reply, NoScriptError):  # a promoted replica has no scripts
                await conn.execute([("SCRIPT", "LOAD", scripts.BET.source)])
                continue
            if isinstance(reply, RedisError):
                await asyncio.sleep(0.02)  # a client's pause before its resend
                continue
            code = reply[0][0]
            if code == BetCode.EPOCH:  # the shard's master changed: the server rotates
                epochs[uid] += 1
                sync.hset(keys.seed(uid), "rid", run_id_of(sync, keys.seed(uid)))
                continue
            assert code in (BetCode.SETTLED, BetCode.REPLAY), reply
            confirmed[uid] += 1
            if failed_over_at is not None:
                after[uid] += 1

    players = [asyncio.create_task(player(uid)) for uid in users]
    await eventually(lambda: _all_bet(confirmed, 3))
    command(replica.port, "CLUSTER", "FAILOVER")
    await eventually(lambda: _true(redis_cluster.is_master(replica)), within=30)
    failed_over_at = time.monotonic()
    await asyncio.gather(*players)

    assert conn.moved >= 1  # the demoted master's MOVED was followed
    moved_users = [u for u in users
                   if sync.get_node_from_key(keys.balances(u)).port == replica.port]
    assert users[0] in moved_users
    assert all(epochs[u] >= 1 for u in moved_users)  # a pair from before the change rotates
    for uid in users:
        balance = int(sync.hget(keys.balances(uid), "USDT") or 0)
        nonce = int(sync.hget(keys.seed(uid), "n") or 0)
        assert (balance, nonce) == (START - STAKE * confirmed[uid], confirmed[uid]), uid


async def _all_bet(confirmed: dict[int, int], n: int) -> bool:
    return all(c >= n for c in confirmed.values())


async def _true(value: bool) -> bool:
    return value
