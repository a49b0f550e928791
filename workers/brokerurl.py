"""Where Dramatiq's broker lives (``BROKER_URL``), worked out without building it.

:mod:`workers.broker` builds the broker when it is imported (every actor binds to it), so
whoever only needs to know whether the setting can work (the launcher, before it starts any
child: stakepro/run.py) asks here. docs/workers.md, "The broker", has the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from plumbing.settings import Settings

REDIS_SCHEMES = ("redis", "rediss")
AMQP_SCHEMES = ("amqp", "amqps")


class BrokerSettingError(ValueError):
    """The broker's setting cannot work; the message names the setting to change."""


def queue_name(settings: Settings) -> str:
    """The actors' one queue (the CLI consumes every queue its actors declare)."""
    return f"{settings.key_prefix}.stakepro"


def redis_is_cluster(url: str) -> bool:
    """Whether the Redis at ``url`` runs in cluster mode (``INFO cluster``). A Redis that
    does not answer is taken as plain: the broker then fails on it as it would anyway, and
    the supervisor's restart asks again."""
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        info: Any = client.info("cluster")
        return bool(int(info.get("cluster_enabled", 0)))
    except redis.RedisError:
        return False
    finally:
        client.close()


def broker_url(settings: Settings,
               is_cluster: Callable[[str], bool] = redis_is_cluster) -> str:
    """``settings.broker_url``, or REDIS_URL's server with database 1 (2 if it uses 1).

    Raises :class:`BrokerSettingError` for a scheme neither broker speaks, and when the
    broker would run on a Redis Cluster node (named, or by default).
    """
    if settings.broker_url:
        scheme = urlsplit(settings.broker_url).scheme
        if scheme not in REDIS_SCHEMES + AMQP_SCHEMES:
            raise BrokerSettingError(
                f"BROKER_URL must be a redis://, rediss://, amqp:// or amqps:// URL, "
                f"got scheme {scheme!r}")
        if scheme in REDIS_SCHEMES and is_cluster(settings.broker_url):
            raise BrokerSettingError(
                "BROKER_URL names a Redis Cluster node, where Dramatiq's broker cannot run "
                "(its scripts build key names: CROSSSLOT): name a plain Redis or RabbitMQ")
        return settings.broker_url
    if is_cluster(settings.redis_url):
        raise BrokerSettingError(
            "REDIS_URL names a Redis Cluster node, where Dramatiq's broker cannot run "
            "(its scripts build key names: CROSSSLOT): set BROKER_URL to a plain Redis "
            "(redis://host:port/db) or RabbitMQ (amqp://user:password@host:5672/vhost)")
    parts = urlsplit(settings.redis_url)
    current = parts.path.strip("/") or "0"
    database = "2" if current == "1" else "1"
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))
