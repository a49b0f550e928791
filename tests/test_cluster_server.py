"""The game server on a real Redis Cluster (3 masters, 3 replicas: tests/rediscluster.py),
two instances sharing nothing but the cluster and one PostgreSQL database, as separate
deployments do (docs/cluster.md).

Users land on all three masters; deposits, admin reads and bets answer on both instances;
the double spend with one player's sockets spread over both settles exactly the affordable
bets; a bet id resent on the other instance replays; a rotation on one instance is seen by
the other; balance pushes, revocations and the feed cross instances over sharded pub/sub;
a user whose heal marker names another run id is healed before its next bet settles. No
CROSSSLOT, MOVED or ASK reaches the log, and the bet path followed no redirect (the cluster
stays still during these tests).

The in-process persister is off: draining the outbox on a cluster is the workers' part, and
none of these checks needs PostgreSQL to hold the bets (a replay is answered from Redis, a
heal reads the user's pending events from the outbox).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from redis.asyncio.cluster import RedisCluster as AsyncCluster
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from games import dice
from plumbing import durability, scripts
from plumbing.heal import run_id
from plumbing.keys import Keys
from plumbing.redisclient import open_client
from plumbing.settings import Settings
from server.redisrouter import ClusterConnection
from server.services import Services, UnsafeRedis, check_eviction_policy
from tests.conftest import ADMIN_TOKEN, Served, serve
from tests.helpers import Api, Player, eventually, json_or_msgpack, keys_of, minor
from tests.rediscluster import RedisCluster, command

_rounds = itertools.count()

#: What must never reach the log of a server on a cluster.
CLUSTER_ERRORS = ("CROSSSLOT", "MOVED", "ASK ", "TRYAGAIN", "ClusterError", "Traceback")


@dataclass
class Two:
    """Two server instances on one cluster and one database."""

    a: Api
    b: Api
    served: tuple[Served, Served]
    settings: Settings
    keys: Keys
    cluster: AsyncCluster


def services_of(served: Served) -> Services:
    services: Services = served.server.config.app.state.services
    return services


@asynccontextmanager
async def instances(
    cluster_settings: Settings, capfd: pytest.CaptureFixture[str], still: bool
) -> AsyncIterator[Two]:
    """Two instances on ``cluster_settings``; afterwards, no cluster error in the log and,
    when the cluster was ``still`` (no failover), no redirect followed by the bet path."""
    settings = cluster_settings.model_copy(update={"inprocess_persister": False})
    client = await open_client(settings.redis_url)
    assert isinstance(client, AsyncCluster)
    try:
        async with serve(settings) as one, serve(settings) as other, \
                Api(one.address, ADMIN_TOKEN) as a, Api(other.address, ADMIN_TOKEN) as b:
            for served in (one, other):
                services = services_of(served)
                assert isinstance(services.batcher.fast, ClusterConnection)
                assert isinstance(services.redis, AsyncCluster)
            yield Two(a, b, (one, other), settings, keys_of(settings), client)
            for served in (one, other):
                fast = services_of(served).batcher.fast
                assert isinstance(fast, ClusterConnection)
                if still:
                    assert (fast.moved, fast.asked, fast.retried) == (0, 0, 0)
    finally:
        await client.aclose()
    out, err = capfd.readouterr()
    logged = out + err
    assert not [word for word in CLUSTER_ERRORS if word in logged], logged[-4000:]


@pytest_asyncio.fixture
async def two(
    cluster_settings: Settings, capfd: pytest.CaptureFixture[str]
) -> AsyncIterator[Two]:
    async with instances(cluster_settings, capfd, still=True) as running:
        yield running


async def test_users_on_every_master_deposit_read_and_bet_on_both_instances(
    two: Two,
) -> None:
    masters = {node.name for node in two.cluster.get_primaries()}
    assert len(masters) == 3
    owner: dict[int, str] = {}
    tokens: dict[int, str] = {}
    while set(owner.values()) != masters:
        assert len(owner) < 40, owner
        uid, token = await two.a.player()
        owner[uid] = two.cluster.get_node_from_key(two.keys.balances(uid)).name
        tokens[uid] = token
        # The bucket names the slot: every key of the user is on that one master.
        for key in (two.keys.seed(uid), two.keys.outbox_for(uid), two.keys.healed(uid),
                    two.keys.user_channel(uid)):
            assert two.cluster.get_node_from_key(key).name == owner[uid]
    for uid, token in tokens.items():
        assert await two.b.deposit(uid, "3.00") == "3.00"
        assert await two.a.deposit(uid, "2.00") == "5.00"
        async with two.a.play(token) as pa, two.b.play(token) as pb:
            first = await pa.bet("1.00", "50.00")
            second = await pb.bet("1.00", "50.00")
        assert first["type"] == second["type"] == "bet_result", (first, second)
        assert (first["nonce"], second["nonce"]) == (1, 2)
        for api in (two.a, two.b):
            assert (await api.user(uid))["balances"]["USDT"] == second["balance"]
        # The user's heal marker holds the run id of its own master.
        marker = await two.cluster.get(two.keys.healed(uid))
        assert marker is not None and marker.decode() == await run_id(two.cluster, two.keys, uid)
    for api in (two.a, two.b):
        r = await api.http.get("/healthz")
        assert r.status_code == 200, r.text
        r = await api.http.get("/metrics")
        assert r.status_code == 200 and "stakepro_" in r.text


async def _fire(p: Player, bet_ids: list[str], amount: str) -> list[dict[str, Any]]:
    """Send every bet before reading any answer (they race the other sockets' bets)."""
    for bet_id in bet_ids:
        await p.send({"type": "bet", "id": bet_id, "currency": "USDT", "amount": amount,
                      "target": "0.01", "direction": "under"})
    return [await p.recv() for _ in bet_ids]


async def test_double_spend_with_sockets_on_two_instances_settles_the_affordable_bets(
    two: Two,
) -> None:
    """Each round: 5.00 on the balance, 20 bets of 1.00 at once from 4 sockets, 2 on each
    instance. The bets win only on a roll of 0.00 (1 in 10,001), so exactly 5 settle and
    leave 0.00; a round where a settled bet wins (it could fund more) is replaced."""
    rounds = 0
    while rounds < 6:
        uid, token = await two.a.player(deposit="5.00")
        async with two.a.sockets(token, 2) as on_a, two.b.sockets(token, 2) as on_b:
            n = next(_rounds)
            players = [*on_a, *on_b]
            ids = [[f"d{n}-{s}-{i}" for i in range(5)] for s in range(len(players))]
            replies = [r for rs in await asyncio.gather(
                *(_fire(p, i, "1.00") for p, i in zip(players, ids, strict=True))) for r in rs]
        settled = [r for r in replies if r["type"] == "bet_result"]
        if any(r["win"] for r in settled):
            continue
        refused = [r for r in replies if r.get("code") == "INSUFFICIENT_FUNDS"]
        assert len(settled) == 5, replies
        assert len(refused) == 15, replies
        assert sorted(r["nonce"] for r in settled) == [1, 2, 3, 4, 5]
        assert sorted(minor(r["balance"]) for r in settled) == [0, 100, 200, 300, 400]
        for api in (two.a, two.b):
            assert (await api.user(uid))["balances"]["USDT"] == "0.00"
        rounds += 1


async def test_a_bet_resent_on_the_other_instance_replays_and_moves_no_money(
    two: Two,
) -> None:
    uid, token = await two.a.player(deposit="10.00")
    async with two.a.play(token) as pa, two.b.play(token) as pb:
        first = await pa.bet("1.00", "50.00", id="same")
        again = await pb.bet("1.00", "50.00", id="same")
        assert first["type"] == "bet_result" and again == first
        for api in (two.a, two.b):
            assert (await api.user(uid))["balances"]["USDT"] == first["balance"]
        conflict = await pb.bet("2.00", "50.00", id="same")
        assert conflict["code"] == "IDEMPOTENCY_CONFLICT" and conflict["id"] == "same"
        nxt = await pb.bet("1.00", "50.00", id="next")
        assert nxt["nonce"] == 2  # neither the replay nor the conflict used a nonce
    assert (await two.b.user(uid))["balances"]["USDT"] == nxt["balance"]


async def test_a_rotation_on_one_instance_reveals_every_bet_of_both(two: Two) -> None:
    uid, token = await two.a.player(deposit="20.00")
    async with two.a.play(token) as pa, two.b.play(token) as pb:
        committed = pa.welcome["seed"]["server_seed_hash"]
        bets = [await (pa if i % 2 else pb).bet("1.00", "50.00") for i in range(6)]
        rotated = await pb.request({"type": "rotate_seed", "id": "rot", "client_seed": "mine-7"})
        assert rotated["type"] == "seed_rotated", rotated
        revealed = rotated["revealed"]
        assert revealed["server_seed_hash"] == committed and revealed["nonce"] == 6
        for r in bets:
            roll = dice.roll(revealed["server_seed"], revealed["client_seed"], r["nonce"])
            assert dice.format_hundredths(roll) == r["roll"]
        # Instance a still holds the revealed pair: its next bet finds the new one.
        after = await pa.bet("1.00", "50.00")
        assert after["nonce"] == 1 and after["client_seed"] == "mine-7", after
        assert after["server_seed_hash"] == rotated["current"]["server_seed_hash"]
    assert (await two.a.user(uid))["balances"]["USDT"] == after["balance"]


async def _push(p: Player, reason: str, within: float = 5.0) -> dict[str, Any]:
    """The next balance push of ``reason`` (frames before it are dropped)."""
    async with asyncio.timeout(within):
        while True:
            message = await p.recv_any()
            if message.get("type") == "balance" and message.get("reason") == reason:
                return message


async def test_pushes_and_revocation_reach_the_other_instance(two: Two) -> None:
    uid, token = await two.a.player(deposit="10.00")
    async with two.a.play(token) as pa, two.b.play(token) as pb:
        # A deposit made through instance a reaches the socket on instance b, and a's own.
        await two.a.deposit(uid, "5.00")
        for p in (pa, pb):
            assert (await _push(p, "deposit"))["balance"] == "15.00"
        on_a = await pa.bet("1.00", "50.00")
        assert (await _push(pb, "bet"))["balance"] == on_a["balance"]
        on_b = await pb.bet("1.00", "50.00")
        assert (await _push(pa, "bet"))["balance"] == on_b["balance"]
        # A revocation sent through instance b closes the socket on instance a.
        r = await two.b.http.post(f"/api/admin/users/{uid}/revoke")
        assert r.status_code == 200, r.text
        for p in (pa, pb):
            error = await asyncio.wait_for(p.recv(), 5)
            assert error["type"] == "error" and error["code"] == "UNAUTHORIZED", error
            assert p.ws is not None
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(p.ws.recv(), 5)


async def bet_settled(p: Player, bet_id: str, unasked: list[dict[str, Any]]) -> dict[str, Any]:
    """A 0.01 bet resent while UNAVAILABLE, as a client does, that must settle."""
    reply = await p.settle({"type": "bet", "id": bet_id, "currency": "USDT", "amount": "0.01",
                            "target": "50.00", "direction": "under"}, unasked)
    assert reply["type"] == "bet_result", reply
    return reply


async def test_a_spectator_on_one_instance_sees_the_bets_of_the_other(two: Two) -> None:
    async with connect(f"ws://{two.b.address}/ws/feed", compression=None) as on_b, \
            connect(f"ws://{two.a.address}/ws/feed", compression=None) as on_a:
        await two.a.feed_is_live(on_b)  # bets through a, seen on b
        await two.b.feed_is_live(on_a)
        _, token = await two.a.player(deposit="10.00")
        async with two.a.play(token) as p:
            placed = await p.bet("1.00", "50.00", id="watched")
        async with asyncio.timeout(10):
            while True:
                frame = json_or_msgpack(await on_b.recv())
                if any(b["bet_id"] == placed["bet_id"] for b in frame["bets"]):
                    break


async def test_a_user_marked_under_another_run_id_is_healed_before_its_bet(two: Two) -> None:
    """The heal marker compared per node: a marker naming another run id (as after its
    master restarted or failed over) refuses the next bet with HEAL; the server heals the
    user from the ledger and the outbox (its deposit and bet are still there) and settles."""
    uid, token = await two.a.player(deposit="10.00")
    async with two.b.play(token) as p:
        first = await p.bet("1.00", "50.00")
        await two.cluster.set(two.keys.healed(uid), "0" * 40)
        # Wrong balance as a rollback could leave it: the heal restores the ledger's.
        await two.cluster.hset(two.keys.balances(uid), "USDT", "99999")
        second = await p.bet("1.00", "50.00")
    assert second["type"] == "bet_result", second
    assert minor(second["balance"]) == minor(first["balance"]) - 100 + minor(second["payout"])
    marker = await two.cluster.get(two.keys.healed(uid))
    assert marker is not None and marker.decode() == await run_id(two.cluster, two.keys, uid)
    for api in (two.a, two.b):
        assert (await api.user(uid))["balances"]["USDT"] == second["balance"]


async def test_a_plain_redis_is_not_taken_for_a_cluster(settings: Settings) -> None:
    """The same server on one Redis keeps the one-node connection and client."""
    async with serve(settings) as served, httpx.AsyncClient() as http:
        services = services_of(served)
        assert not isinstance(services.batcher.fast, ClusterConnection)
        assert not isinstance(services.redis, AsyncCluster)
        r = await http.get(f"http://{served.address}/healthz")
        assert r.status_code == 200, r.text


async def flush_scripts(cluster: AsyncCluster) -> None:
    for node in cluster.get_primaries():
        await cluster.execute_command("SCRIPT", "FLUSH", target_nodes=node)
        assert await cluster.execute_command(
            "SCRIPT", "EXISTS", scripts.BET.sha, target_nodes=node) == [0]


async def test_scripts_flushed_from_every_master_are_loaded_again(two: Two) -> None:
    """A promoted replica has no scripts (Redis 7 does not replicate the script cache): with
    every master's cache flushed, a deposit and a bet (the bet path's connection) and a
    sign-in (the limits' scripts on the general client) load them again and go through."""
    uid, token = await two.a.player(deposit="5.00")
    await flush_scripts(two.cluster)
    assert await two.b.deposit(uid, "1.00") == "6.00"
    await flush_scripts(two.cluster)
    async with two.a.play(token) as p:  # sign-in: rate-1 and hold-1
        await flush_scripts(two.cluster)
        r = await p.bet("1.00", "50.00")
    assert r["type"] == "bet_result" and r["nonce"] == 1, r
    assert (await two.b.user(uid))["balances"]["USDT"] == r["balance"]


async def test_every_master_is_checked_for_eviction_and_durability(
    redis_cluster: Any, cluster_settings: Settings
) -> None:
    """One master with an evicting policy stops the server; the durability report speaks
    for the weakest master (the test cluster keeps no AOF)."""
    client = await open_client(cluster_settings.redis_url)
    assert isinstance(client, AsyncCluster)
    last = client.get_primaries()[-1]
    try:
        assert await durability.check(client, "none") is None
        problem = await durability.check(client, "always")
        assert problem is not None and "AOF is off" in problem
        await check_eviction_policy(client)
        await client.config_set("maxmemory-policy", "allkeys-lru", target_nodes=last)
        with pytest.raises(UnsafeRedis, match=last.name):
            await check_eviction_policy(client)
        with pytest.raises(UnsafeRedis, match="allkeys-lru"):
            await Services.start(cluster_settings)
    finally:
        await client.config_set("maxmemory-policy", "noeviction", target_nodes=last)
        await client.aclose()


@pytest.mark.parametrize("how", ["failover", "kill"])
async def test_pushes_and_the_feed_follow_a_failover(
    redis_cluster: RedisCluster, cluster_settings: Settings,
    capfd: pytest.CaptureFixture[str], how: str,
) -> None:
    """The master holding a user and the feed channel is replaced by its replica (CLUSTER
    FAILOVER on the replica, or the master killed with SIGKILL), with the user's sockets on
    both instances and a spectator: bets go on (resent while UNAVAILABLE; the user is
    healed and its pair rotated under the new run id), and the pushes and the feed follow
    the channels to the promoted replica. A demoted master drops its subscribers with a
    sunsubscribe of its own; a killed one drops their connections."""
    async with instances(cluster_settings, capfd, still=False) as two:
        feed_master = two.cluster.get_node_from_key(two.keys.feed_channel()).port
        for _ in range(60):
            uid, token = await two.a.player(deposit="100.00")
            if two.cluster.get_node_from_key(two.keys.balances(uid)).port == feed_master:
                break
        else:
            raise AssertionError("no user on the feed channel's master")
        by_port = {node.port: node for node in redis_cluster.nodes}
        replica = redis_cluster.replica_of(by_port[feed_master])
        async with two.a.play(token) as pa, two.b.play(token) as pb, \
                connect(f"ws://{two.b.address}/ws/feed", compression=None) as spectator:
            await two.a.feed_is_live(spectator)
            master = by_port[feed_master]
            try:
                if how == "kill":
                    master.stop(kill=True)
                else:
                    await asyncio.to_thread(command, replica.port, "CLUSTER", "FAILOVER")
                await eventually(
                    lambda: asyncio.to_thread(redis_cluster.is_master, replica), within=30)
            finally:  # back as a replica: the session's cluster is whole again
                if master.proc is None:
                    master.start()
                await asyncio.to_thread(redis_cluster.wait_ok, time.monotonic() + 60)
            ids = itertools.count()
            unasked: list[dict[str, Any]] = []

            async def pushed_across() -> bool:
                """A bet on instance a whose own push reaches the socket on instance b."""
                placed = await bet_settled(pa, f"f{next(ids)}", unasked)
                try:
                    async with asyncio.timeout(1.0):
                        while (await _push(pb, "bet"))["balance"] != placed["balance"]:
                            pass
                except TimeoutError:
                    return False
                return True

            await eventually(pushed_across, within=20)
            await two.a.feed_is_live(spectator)
            last = await bet_settled(pb, "after", unasked)
        assert minor((await two.a.user(uid))["balances"]["USDT"]) == minor(last["balance"])
        fast = services_of(two.served[0]).batcher.fast
        assert isinstance(fast, ClusterConnection) and fast.refreshes >= 2
