"""Dramatiq's broker: configured here, before any actor is imported.

``import workers.broker`` builds the broker from :class:`plumbing.settings.Settings` and
makes it the global broker; :mod:`workers.actors` imports this module first, so every
``@dramatiq.actor`` binds to it.

Where it lives, one setting: ``BROKER_URL``, a plain Redis (``redis://``, ``rediss://``:
:class:`~dramatiq.brokers.redis.RedisBroker`) or RabbitMQ (``amqp://``, ``amqps://``:
:class:`~dramatiq.brokers.rabbitmq.RabbitmqBroker`, with publisher confirms so an enqueue
that returned is in the broker). Empty: the Redis server of ``REDIS_URL`` with database 1
(2 if ``REDIS_URL`` itself names database 1), unless that server is a Redis Cluster node:
Dramatiq builds key names inside its own Lua scripts, which a cluster refuses (CROSSSLOT),
so then the workers refuse to start and name ``BROKER_URL`` (:class:`BrokerSettingError`).

Two deployments (or two test runs) may share a broker: the Redis broker's keys are
namespaced ``<KEY_PREFIX>-dramatiq``, and the queue is ``<KEY_PREFIX>.stakepro``
(:func:`queue_name`), which is what keeps them apart in one RabbitMQ virtual host.

Middleware: Dramatiq's defaults (age limit, time limit, shutdown notifications, callbacks,
pipelines, retries), then :class:`~dramatiq.middleware.asyncio.AsyncIO` (one event loop
thread per worker process, so actors may be ``async def``), then :class:`Lifecycle`, which
tells the actors a shutdown has begun and closes their clients once the worker threads are
done (it comes after AsyncIO: ``after_*`` hooks run in reverse order, so it closes the
clients while the event loop still runs).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware, default_middleware
from dramatiq.middleware.asyncio import AsyncIO

from plumbing.settings import Settings

# The broker's address is worked out in workers/brokerurl.py, which builds nothing on import
# (the launcher checks it there before it starts any child).
from workers.brokerurl import (
    AMQP_SCHEMES,
    REDIS_SCHEMES,
    BrokerSettingError,
    broker_url,
    queue_name,
    redis_is_cluster,
)

__all__ = ["AMQP_SCHEMES", "REDIS_SCHEMES", "BrokerSettingError", "Lifecycle", "broker_url",
           "build", "queue_name", "redis_is_cluster"]

class Lifecycle(Middleware):
    """Calls the hooks :mod:`workers.actors` registers: stopping (before the worker threads
    are stopped) and closing (after, while the AsyncIO event loop still runs)."""

    def __init__(self) -> None:
        self.on_stopping: list[Any] = []
        self.on_stopped: list[Any] = []

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        for hook in self.on_stopping:
            hook()

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        for hook in self.on_stopped:
            hook()


def build(settings: Settings) -> tuple[dramatiq.Broker, Lifecycle]:
    lifecycle = Lifecycle()
    middleware = [m() for m in default_middleware] + [AsyncIO(), lifecycle]
    url = broker_url(settings)
    broker: dramatiq.Broker
    if urlsplit(url).scheme in AMQP_SCHEMES:
        broker = RabbitmqBroker(url=url, middleware=middleware, confirm_delivery=True)
    else:
        broker = RedisBroker(  # type: ignore[no-untyped-call]
            url=url, middleware=middleware, namespace=f"{settings.key_prefix}-dramatiq",
        )
    return broker, lifecycle


SETTINGS = Settings()
QUEUE = queue_name(SETTINGS)
broker, lifecycle = build(SETTINGS)
dramatiq.set_broker(broker)
