"""What the ledger Redis keeps when it crashes, checked against what the deployment accepts.

Redis holds acknowledged bets until the workers move them to PostgreSQL. With AOF and
``appendfsync always`` nothing acknowledged is lost by a Redis or machine crash; with
``everysec`` a machine crash can lose about a second of them, with AOF off a Redis crash
loses everything since the start (docs/durability.md has the measurements). The default
accepts only ``always``; ``REDIS_DURABILITY=everysec`` or ``none`` accepts less, on purpose.

:func:`check` reads ``CONFIG GET appendonly / appendfsync``; where CONFIG is renamed or
refused (managed Redis services do that), ``INFO persistence`` still says whether AOF is on,
and the policy is reported as unknown. On a Redis Cluster every master is asked and the
weakest one decides (each holds its own part of the ledger).
"""

from __future__ import annotations

from typing import Any, Literal

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ResponseError

from plumbing.redisclient import Client, open_client

Durability = Literal["always", "everysec", "none"]

#: How much each policy keeps, weakest first.
_RANK = {"none": 0, "no": 0, "everysec": 1, "always": 2}


async def observed(redis: Client) -> str:
    """The policy the Redis at hand runs: ``always``, ``everysec``, ``no`` (AOF on, never
    fsynced), ``none`` (AOF off) or ``unknown`` (AOF on, CONFIG refused); on a cluster, the
    weakest of its masters' (``unknown`` ranks above ``none`` and below the others)."""
    if not isinstance(redis, RedisCluster):
        return await _observed_on(redis, None)
    policies = [await _observed_on(redis, node) for node in redis.get_primaries()]
    return min(policies, key=lambda p: _RANK.get(p, 0.5))


async def _observed_on(redis: Client, node: ClusterNode | None) -> str:
    where: dict[str, Any] = {} if node is None else {"target_nodes": node}
    try:
        config = await redis.config_get("append*", **where)
    except ResponseError:
        info = await redis.info("persistence", **where)
        return "unknown" if int(info.get("aof_enabled", 0)) else "none"
    text = {_text(k): _text(v) for k, v in config.items()}
    if text.get("appendonly") != "yes":
        return "none"
    return text.get("appendfsync", "unknown")


async def check(redis: Client, accepted: Durability) -> str | None:
    """None when the Redis keeps at least what ``accepted`` asks (on a cluster, every
    master does), else why not (one line, for an error-level log line, the launcher's
    output and /healthz)."""
    policy = await observed(redis)
    if policy == "unknown":
        if accepted == "none":
            return None
        return ("the ledger Redis has AOF on but its appendfsync policy cannot be read "
                "(CONFIG refused): acknowledged bets may be lost on a crash unless it is "
                "'always'; set REDIS_DURABILITY=everysec to accept that")
    if _RANK.get(policy, 0) >= _RANK[accepted]:
        return None
    kept = "AOF is off" if policy == "none" else f"appendfsync is {policy}"
    loses = ("everything since its start on any crash" if policy in ("none", "no")
             else "about the last second on a machine crash")
    return (f"the ledger Redis may lose acknowledged bets: {kept} ({loses}); run it with "
            f"--appendonly yes --appendfsync always, or accept it with "
            f"REDIS_DURABILITY={'everysec' if policy == 'everysec' else 'none'}")


async def check_url(url: str, accepted: Durability) -> str | None:
    """:func:`check` on a client of its own (the launcher, before it starts anything); a
    cluster node's URL checks every master of that cluster."""
    redis = await open_client(url)
    try:
        return await check(redis, accepted)
    finally:
        await redis.aclose()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
