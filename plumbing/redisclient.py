"""The general Redis client, for one Redis or a Redis Cluster, chosen from ``REDIS_URL``.

``REDIS_URL`` may name a plain Redis or any node of a cluster: :func:`open_client` asks
the server (``INFO cluster``) and returns a ``redis.asyncio.Redis`` or a
``redis.asyncio.cluster.RedisCluster``. The rest of the code takes a :data:`Client` and
uses what both answer the same way (single-slot commands, pipelines of them, EVALSHA
through :mod:`plumbing.scripts`); what is per node on a cluster goes through the
functions here:

- :func:`each_master_info`: INFO of every master (eviction policy, persistence);
- :func:`scan_keys`: SCAN over every master.

SCRIPT LOAD through a cluster client goes to every master already (redis-py's routing).

The game server picks its bet path's connection (server/resp.py or server/redisrouter.py)
from the client :func:`open_client` made (:func:`is_cluster`): one question to the node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

Client: TypeAlias = aioredis.Redis | RedisCluster


async def cluster_enabled(url: str, connect_timeout: float = 5.0) -> bool:
    """Whether the Redis at ``url`` is a node of a cluster (``INFO cluster``)."""
    probe = aioredis.Redis.from_url(url, socket_connect_timeout=connect_timeout)
    try:
        info: Any = await probe.info("cluster")
    finally:
        await probe.aclose()
    return bool(int(info.get("cluster_enabled", 0)))


async def open_client(url: str, **options: Any) -> Client:
    """A client of the Redis at ``url``: a cluster client when that Redis is a cluster
    node (the slot map read once here), else a plain one. ``options`` go to both."""
    if await cluster_enabled(url):
        cluster = RedisCluster.from_url(url, **options)
        await cluster.initialize()
        return cluster
    return aioredis.Redis.from_url(url, **options)


def is_cluster(client: Client) -> bool:
    return isinstance(client, RedisCluster)


async def each_master_info(client: Client, section: str) -> dict[str, dict[str, Any]]:
    """``INFO section`` of each master (of the one Redis when not a cluster), by node name."""
    if isinstance(client, RedisCluster):
        replies: Any = await client.info(section, target_nodes=RedisCluster.PRIMARIES)
        if len(client.get_primaries()) == 1:  # redis-py unwraps a single node's reply
            return {client.get_primaries()[0].name: dict(replies)}
        return {str(name): dict(info) for name, info in replies.items()}
    return {"redis": dict(await client.info(section))}


async def scan_keys(client: Client, match: str, count: int = 1000) -> AsyncIterator[bytes]:
    """Every key matching ``match``, on every master (redis-py's cluster SCAN visits each)."""
    async for key in client.scan_iter(match=match, count=count):
        yield key
