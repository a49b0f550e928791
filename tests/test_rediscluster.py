"""The Redis Cluster fixture is a real cluster: 3 masters with a replica each, every slot
served, keys of a bucket on one master, a call across buckets refused with CROSSSLOT, and a
user's bet (lua/bet-n.lua, the server's KEYS/ARGV shape) settling on the master of its slot."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster as SyncCluster
from redis.exceptions import ResponseError

from plumbing import scripts
from plumbing.keys import Keys, bucket_of
from tests.rediscluster import RedisCluster, command

KEYS = Keys("tc", 64)


@pytest.fixture
def client(redis_cluster: RedisCluster) -> Iterator[SyncCluster]:
    node = redis_cluster.nodes[-1]  # any node will do: the client learns the rest
    c = SyncCluster(host="127.0.0.1", port=node.port)
    yield c
    c.close()


def test_three_masters_three_replicas_every_slot(redis_cluster: RedisCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    roles = [command(n.port, "ROLE").split()[0] for n in redis_cluster.nodes]
    assert sorted(roles) == ["master"] * 3 + ["slave"] * 3
    for node in redis_cluster.nodes:
        info = node.info()
        assert info["cluster_state"] == "ok"
        assert info["cluster_slots_assigned"] == "16384"


def test_buckets_spread_over_every_master(client: SyncCluster) -> None:
    owners = {client.get_node_from_key(KEYS.outbox(b)).name for b in range(64)}
    assert len(owners) == 3


def test_a_call_across_buckets_is_refused(client: SyncCluster) -> None:
    a, b = 1, next(u for u in range(2, 500) if client.keyslot(KEYS.balances(u))
                   != client.keyslot(KEYS.balances(1)))
    node = client.get_node_from_key(KEYS.balances(a))
    reply = command(node.port, "EVAL", "return 1", "2", KEYS.balances(a), KEYS.balances(b))
    assert reply.startswith("CROSSSLOT"), reply
    with pytest.raises(ResponseError, match="same slot"):  # redis-py drops the code word
        client.execute_command(
            "EVAL", "return 1", 2, KEYS.balances(a), KEYS.balances(b), target_nodes=node
        )


def test_a_bet_settles_on_the_master_of_its_slot(client: SyncCluster) -> None:
    users = [u for u in range(1, 200) if bucket_of(u, 64) in (0, 1, 2, 3, 5, 8, 13)][:12]
    for uid in users:
        client.hset(KEYS.balances(uid), "USDT", "1000")
        client.hset(KEYS.seed(uid), mapping={"pid": "7", "ss": "s", "sh": "h", "cs": "c",
                                             "n": "0", "rid": "r"})
        client.set(KEYS.healed(uid), "r")  # its state matches the ledger under run "r"
    for uid in users:
        keys = [KEYS.balances(uid), KEYS.seed(uid), KEYS.outbox_for(uid),
                KEYS.user_channel(uid), KEYS.healed(uid), KEYS.bet_idem(uid, 1)]
        args = ["7", "r", "300000", "0",
                "USDT", "100", "-100", "0", "USDT|100|5000|under", b"event", "sock"]
        reply = client.execute_command("EVAL", scripts.BET.source, len(keys), *keys, *args)
        assert reply[0][:3] == [0, b"900", 1]
        again = client.execute_command("EVAL", scripts.BET.source, len(keys), *keys, *args)
        assert again[0][0] == 1  # REPLAY: nothing moved twice
        assert client.hget(KEYS.balances(uid), "USDT") == b"900"
        assert client.xlen(KEYS.outbox_for(uid)) >= 1
