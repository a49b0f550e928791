"""The clients and components of one server process, created and closed by the lifespan."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
import structlog
from redis.exceptions import BusyLoadingError

from games.bets import BetChecker
from plumbing import durability
from plumbing.keys import Keys
from plumbing.redisclient import Client, each_master_info, is_cluster, open_client
from plumbing.settings import Settings
from server.feed import Feed
from server.limits import Limits, Rate, UserMeter
from server.metrics import Metrics
from server.pubsub import Hub
from server.pushes import Pushes
from server.redisbatch import Batcher, BetConnection
from server.redisconn import RunId
from server.redisrouter import ClusterConnection
from server.resp import FastConnection
from server.tokens import Tokens
from server.wallet import Wallet

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: The only eviction policy under which Redis never deletes a key to make room: any other
#: would silently delete balances, seed pairs or unpersisted outbox entries.
SAFE_EVICTION = "noeviction"


@dataclass
class Services:
    settings: Settings
    #: The general client: a plain Redis, or a Redis Cluster client when REDIS_URL names
    #: a cluster node (plumbing/redisclient.py).
    redis: Client
    pool: asyncpg.Pool
    keys: Keys
    batcher: Batcher
    wallet: Wallet
    hub: Hub
    pushes: Pushes
    metrics: Metrics
    #: Unique per process: socket ids are ``<instance>:<n>``.
    instance: str
    #: The public bet feed (/ws/feed); created by start().
    feed: Feed = field(init=False)
    #: Validates bet requests, remembering the ones seen before.
    checker: BetChecker = field(init=False)
    limits: Limits = field(init=False)
    #: Per-user message and bet rates (server/limits.py).
    meter: UserMeter = field(init=False)
    tokens: Tokens = field(init=False)
    #: Why the ledger Redis may lose acknowledged bets (plumbing/durability.py), or None.
    durability: str | None = None

    @classmethod
    async def start(cls, settings: Settings) -> Services:
        # First: it refuses a REDIS_URL it cannot honour before anything is opened.
        fast: BetConnection = FastConnection(
            settings.redis_url, RunId(), read_timeout=settings.redis_read_timeout_s
        )
        client = await _when_loaded_value(lambda: open_client(settings.redis_url))
        if is_cluster(client):
            fast = ClusterConnection(
                settings.redis_url, read_timeout=settings.redis_read_timeout_s
            )
        try:
            await _when_loaded(lambda: check_eviction_policy(client))
        except BaseException:
            await client.aclose()
            await fast.close()
            raise
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=10)
        keys = Keys(settings.key_prefix, settings.buckets)
        batcher = Batcher(client, fast)
        await _when_loaded(batcher.load_scripts)
        wallet = Wallet(
            batcher, pool, keys, settings.currencies, settings.idempotency_window_s,
            settings.outbox_max_len,
        )
        hub = Hub(client, keys.heartbeat())
        await hub.start()
        services = cls(
            settings, client, pool, keys, batcher, wallet, hub, Pushes(hub, keys), Metrics(),
            uuid.uuid4().hex[:12],
        )
        services.checker = BetChecker(settings.currencies, settings.house_edge_bp)
        services.limits = Limits(client, keys)
        services.meter = UserMeter(services.limits, (
            Rate("messages", settings.user_messages_per_s, settings.user_messages_burst),
            Rate("bets", settings.user_bets_per_s, settings.user_bets_burst),
        ))
        services.tokens = Tokens(client, pool, keys, settings.token_ttl_s)
        services.durability = await durability.check(client, settings.redis_durability)
        if services.durability:
            log.error("redis_durability", problem=services.durability)
        services.feed = Feed(
            client, hub, keys.feed_channel(), services.metrics, settings.feed_interval_s
        )
        services.feed.start()
        return services

    async def close(self) -> None:
        await self.meter.close()
        await self.feed.close()  # before the hub: it publishes the last bets settled here
        await self.hub.close()
        await self.pool.close()
        await self.batcher.fast.close()
        await self.redis.aclose()


class UnsafeRedis(RuntimeError):
    """Redis is configured so that it could lose money silently: the server does not start."""


async def check_eviction_policy(client: Client) -> None:
    """Refuse a Redis whose ``maxmemory-policy`` is not ``noeviction`` (on a cluster, any
    master's). Read from INFO, not CONFIG, which managed services often forbid."""
    for node, info in (await each_master_info(client, "memory")).items():
        policy = info.get("maxmemory_policy")
        text = policy.decode() if isinstance(policy, bytes) else str(policy)
        if text != SAFE_EVICTION:
            where = "" if node == "redis" else f" on the cluster master {node}"
            raise UnsafeRedis(
                f"Redis maxmemory-policy is {text!r}{where}: it must be {SAFE_EVICTION!r}"
                f" (eviction would silently delete balances). Run CONFIG SET"
                f" maxmemory-policy {SAFE_EVICTION} and set it in redis.conf."
            )


#: Seconds a starting server waits for a Redis that is still loading its data (AOF replay).
REDIS_LOADING_WAIT_S = 120.0


async def _when_loaded(call: Callable[[], Awaitable[None]]) -> None:
    """Run ``call``, waiting while Redis answers LOADING (a restarted Redis replaying a large
    AOF); any other failure is raised at once."""
    await _when_loaded_value(call)


async def _when_loaded_value(call: Callable[[], Awaitable[T]]) -> T:
    """:func:`_when_loaded` for a call whose result is wanted."""
    deadline = time.monotonic() + REDIS_LOADING_WAIT_S
    while True:
        try:
            return await call()
        except BusyLoadingError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
