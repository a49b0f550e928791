"""server/redisrouter.py on a real Redis Cluster (tests/rediscluster.py): cluster mode is
detected, bets of users on every master settle in one batch and replay when resent, no
call meets CROSSSLOT or an unfollowed MOVED, and a manual failover under load costs at
most a few unconfirmed calls (answered after a resend), a NOSCRIPT (Redis 7 does not
replicate the script cache: the scripts are loaded again, as the server does) and an
EPOCH for the failed-over shard's pairs, never a lost or doubled stake."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.cluster import RedisCluster as SyncCluster
from redis.exceptions import NoScriptError, RedisError

from games.codes import BetCode
from plumbing import scripts
from plumbing.keys import Keys
from plumbing.redisclient import cluster_enabled
from server.redisconn import RUN_ID
from server.redisrouter import ClusterConnection, slot_of
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
    """The run id of the master of ``key`` now (the map is read again after a change)."""
    for _ in range(50):
        try:
            node = sync.get_node_from_key(key)
            info = sync.get_redis_connection(node).info("server")
            if "role:master" in command(node.port, "INFO", "replication"):
                return str(info["run_id"])
        except (RedisError, OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.1)
        sync.nodes_manager.initialize()
    raise AssertionError(f"no master for {key}")


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
    rid = run_id_of(sync, keys.seed(uid))
    sync.hset(keys.seed(uid), mapping={"pid": "1", "ss": "s", "sh": "h", "cs": "c", "n": "0",
                                       "rid": rid})
    sync.set(keys.healed(uid), rid)  # its state matches the ledger under this run


def bet(keys: Keys, uid: int, nonce: int) -> Command:
    """Bet ``nonce + 1`` of ``uid`` (a loss of STAKE), as the wallet builds it: RUN_ID in
    ARGV[2] for the connection to fill in per node."""
    return ("EVALSHA", scripts.BET.sha, 6, keys.balances(uid), keys.seed(uid),
            keys.outbox_for(uid), keys.user_channel(uid), keys.healed(uid),
            keys.bet_idem(uid, nonce + 1),
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


class Players:
    """Users betting in a closed loop through ``conn`` until, after ``changed_at`` is set,
    each has had ``after_change`` more bets confirmed. What a client and the server do is
    done here: a call not confirmed (a connection lost, no master reachable) is resent
    with the same id; NOSCRIPT loads the scripts; HEAL marks the user healed under the new
    master's run id; EPOCH installs a pair under the new
    master's run id (the server rotates); STALE takes the stored nonce."""

    def __init__(self, conn: ClusterConnection, sync: SyncCluster, keys: Keys,
                 users: list[int], after_change: int = 5) -> None:
        self.conn, self.sync, self.keys, self.users = conn, sync, keys, users
        self.nonce = dict.fromkeys(users, 0)
        self.confirmed = dict.fromkeys(users, 0)
        self.epochs = dict.fromkeys(users, 0)
        self.after = dict.fromkeys(users, 0)
        self.after_change = after_change
        self.changed_at: float | None = None
        self.unconfirmed = 0
        self.last: dict[int, Any] = {}

    async def run(self, within: float = 60.0) -> None:
        await asyncio.gather(*(self._player(uid, within) for uid in self.users))

    async def _player(self, uid: int, within: float) -> None:
        deadline = time.monotonic() + within
        while self.changed_at is None or self.after[uid] < self.after_change:
            assert time.monotonic() < deadline, f"no bets after the change: {self.last[uid]!r}"
            try:
                if self.conn.ready_run_id() is None:
                    await self.conn.connect()
                (reply,) = await send_batch(self.conn, [bet(self.keys, uid, self.nonce[uid])])
            except RedisError as exc:  # no master reachable yet: resent, as on UNAVAILABLE
                reply = exc
            self.last[uid] = reply
            if isinstance(reply, NoScriptError):  # a promoted replica has no scripts
                await self.conn.execute([("SCRIPT", "LOAD", scripts.BET.source)])
                continue
            if isinstance(reply, RedisError):
                self.unconfirmed += 1
                await asyncio.sleep(0.02)  # a client's pause before its resend
                continue
            code = reply[0][0]
            if code == BetCode.HEAL:
                # The server heals the user from the ledger (plumbing/heal.py); with no
                # ledger here, the shard's state is taken as it is, under the new run id.
                self.sync.set(self.keys.healed(uid), run_id_of(self.sync, self.keys.seed(uid)))
                continue
            if code == BetCode.EPOCH:
                self.epochs[uid] += 1
                seed = self.keys.seed(uid)
                self.sync.hset(seed, "rid", run_id_of(self.sync, seed))
                continue
            if code == BetCode.STALE:
                self.nonce[uid] = int(reply[0][2])
                continue
            assert code in (BetCode.SETTLED, BetCode.REPLAY), reply
            self.nonce[uid] += 1
            self.confirmed[uid] += 1
            if self.changed_at is not None:
                self.after[uid] += 1

    def ledger(self, uid: int) -> tuple[int, int]:
        """(balance, stored nonce) of ``uid`` on its master now."""
        balance = int(self.sync.hget(self.keys.balances(uid), "USDT") or 0)
        return balance, int(self.sync.hget(self.keys.seed(uid), "n") or 0)


def shard_users(sync: SyncCluster, keys: Keys, users: list[int], port: int) -> list[int]:
    return [u for u in users if sync.get_node_from_key(keys.balances(u)).port == port]


async def test_a_failover_under_load_loses_and_doubles_nothing(
    conn: ClusterConnection, sync: SyncCluster, redis_cluster: RedisCluster
) -> None:
    keys = Keys("rt2", 64)
    users = users_on_every_master(sync, keys, 2)
    for uid in users:
        fund(sync, keys, uid)
    by_port = {n.port: n for n in redis_cluster.nodes}
    owner = by_port[sync.get_node_from_key(keys.balances(users[0])).port]
    replica = redis_cluster.replica_of(owner)
    load = Players(conn, sync, keys, users)
    running = asyncio.create_task(load.run())
    try:
        await eventually(lambda: _all_at_least(load.confirmed, 3))
        command(replica.port, "CLUSTER", "FAILOVER")
        await eventually(lambda: _true(redis_cluster.is_master(replica)), within=30)
        load.changed_at = time.monotonic()
        await running
    finally:  # the old master rejoins as a replica: the session's cluster is whole again
        redis_cluster.wait_ok(time.monotonic() + 60)

    assert conn.moved >= 1  # the demoted master's MOVED was followed
    moved = shard_users(sync, keys, users, replica.port)
    assert users[0] in moved
    assert all(load.epochs[u] >= 1 for u in moved)  # a pair from before the change rotates
    for uid in users:  # a manual failover waits for the replica: nothing confirmed is lost
        assert load.ledger(uid) == (START - STAKE * load.confirmed[uid], load.confirmed[uid])


async def test_a_killed_master_is_replaced_and_bets_continue(
    conn: ClusterConnection, sync: SyncCluster, redis_cluster: RedisCluster
) -> None:
    keys = Keys("rt3", 64)
    users = users_on_every_master(sync, keys, 2)
    for uid in users:
        fund(sync, keys, uid)
    by_port = {n.port: n for n in redis_cluster.nodes}
    victim = by_port[sync.get_node_from_key(keys.balances(users[0])).port]
    replica = redis_cluster.replica_of(victim)
    load = Players(conn, sync, keys, users)
    running = asyncio.create_task(load.run())
    try:
        await eventually(lambda: _all_at_least(load.confirmed, 3))
        victim.stop(kill=True)
        await eventually(lambda: _true(redis_cluster.is_master(replica)), within=30)
        load.changed_at = time.monotonic()
        await running
    finally:
        if victim.proc is None:  # back as a replica, so the session's cluster is whole again
            victim.start()
            redis_cluster.wait_ok(time.monotonic() + 60)

    sync.nodes_manager.initialize()
    assert load.unconfirmed >= 1  # the kill was felt: calls went unanswered, then resent
    moved = shard_users(sync, keys, users, replica.port)
    assert users[0] in moved
    assert all(load.epochs[u] >= 1 for u in moved)
    for uid in users:
        balance, nonce = load.ledger(uid)
        # Replication is asynchronous: the new master may lack the last bets the old one
        # confirmed (the EPOCH rotation covers their rolls), but what it holds is whole.
        assert balance == START - STAKE * nonce, uid
        assert nonce <= load.confirmed[uid], uid
        if uid not in moved:
            assert nonce == load.confirmed[uid], uid


async def _all_at_least(counts: dict[int, int], n: int) -> bool:
    return all(c >= n for c in counts.values())


async def _true(value: bool) -> bool:
    return value


def asking(port: int, *commands: str) -> str:
    """``commands`` on one connection to ``port``, each after ASKING (it holds for one
    command)."""
    done = subprocess.run(
        ["redis-cli", "-p", str(port)], input="".join(f"ASKING\n{c}\n" for c in commands),
        capture_output=True, text=True, timeout=5, check=True,
    )
    return done.stdout


async def test_a_slot_in_migration_is_asked_retried_then_moved(
    conn: ClusterConnection, sync: SyncCluster, redis_cluster: RedisCluster
) -> None:
    keys = Keys("rt4", 64)
    uid = 1
    slot = slot_of(bet(keys, uid, 0))
    assert slot is not None
    source = sync.get_node_from_key(keys.balances(uid)).port
    target = next(n.port for n in redis_cluster.masters() if n.port != source)
    source_id = command(source, "CLUSTER", "MYID").strip()
    target_id = command(target, "CLUSTER", "MYID").strip()
    command(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
    command(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
    try:
        # The user's keys are on the target already; the source has none and says ASK.
        target_rid = command(target, "INFO", "server").split("run_id:")[1].split()[0]
        asking(target, f"HSET {keys.balances(uid)} USDT {START}",
               f"HSET {keys.seed(uid)} pid 1 ss s sh h cs c n 0 rid {target_rid}",
               f"SET {keys.healed(uid)} {target_rid}")
        read = ("EVAL", "return redis.call('HGET', KEYS[1], 'USDT')", 1, keys.balances(uid))
        assert await conn.execute([read]) == [str(START).encode()]
        assert (conn.asked, conn.moved) == (1, 0)
        # A bet's keys are split between the two ends (its outbox and idempotency record
        # do not exist yet): TRYAGAIN, resent until the migration ends.
        betting = asyncio.create_task(send_batch(conn, [bet(keys, uid, 0)]))
        await eventually(lambda: _true(conn.retried >= 1))
        assert not betting.done()
    finally:  # the migration ends: the slot is the target's on every master
        for node in redis_cluster.masters():
            command(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        redis_cluster.wait_ok(time.monotonic() + 30)
    (reply,) = await betting
    assert not isinstance(reply, Exception), str(reply)
    assert reply[0][:3] == [BetCode.SETTLED, str(START - STAKE).encode(), 1]
    assert conn.moved >= 1  # the source's MOVED, once the slot was the target's
    (reply,) = await send_batch(conn, [bet(keys, uid, 1)])
    assert reply[0][:3] == [BetCode.SETTLED, str(START - 2 * STAKE).encode(), 2]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=60))
async def test_every_reply_reaches_its_own_caller(
    conn: ClusterConnection, users: list[int]
) -> None:
    """A batch split over the masters and answered in pieces: each command gets exactly
    its own reply (the key it named, echoed by the script), whatever the mix of nodes."""
    keys = Keys("rt5", 64)
    echo = "return KEYS[1]"
    batch: list[Command] = [("EVAL", echo, 1, keys.balances(u)) for u in users]
    replies = await send_batch(conn, batch)
    assert replies == [keys.balances(u).encode() for u in users]
