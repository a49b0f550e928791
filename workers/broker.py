"""Dramatiq's broker: configured here, before any actor is imported.

``import workers.broker`` builds a :class:`dramatiq.brokers.redis.RedisBroker` from
:class:`plumbing.settings.Settings` and makes it the global broker; :mod:`workers.actors`
imports this module first, so every ``@dramatiq.actor`` binds to it.

Where it lives: ``BROKER_URL``, or when that is empty the Redis server of ``REDIS_URL`` with
database 1 (2 if ``REDIS_URL`` itself names database 1). Never the balance cluster: Dramatiq
builds key names inside its own Lua scripts, which a Redis Cluster refuses (CROSSSLOT); it
runs on a plain Redis (or database) beside it. Its keys are namespaced by ``KEY_PREFIX``, so
two deployments (or two test runs) sharing a broker Redis never take each other's messages.

Middleware: Dramatiq's defaults (age limit, time limit, shutdown notifications, callbacks,
pipelines, retries), then :class:`~dramatiq.middleware.asyncio.AsyncIO` (one event loop
thread per worker process, so actors may be ``async def``), then :class:`Lifecycle`, which
tells the actors a shutdown has begun and closes their clients once the worker threads are
done (it comes after AsyncIO: ``after_*`` hooks run in reverse order, so it closes the
clients while the event loop still runs).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware, default_middleware
from dramatiq.middleware.asyncio import AsyncIO

from plumbing.settings import Settings

#: The one queue of the actors (the CLI consumes every queue its actors declare).
QUEUE = "stakepro"


def broker_url(settings: Settings) -> str:
    """``settings.broker_url``, or REDIS_URL's server with database 1 (2 if it uses 1)."""
    if settings.broker_url:
        return settings.broker_url
    parts = urlsplit(settings.redis_url)
    current = parts.path.strip("/") or "0"
    database = "2" if current == "1" else "1"
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))


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


def build(settings: Settings) -> tuple[RedisBroker, Lifecycle]:
    lifecycle = Lifecycle()
    middleware = [m() for m in default_middleware] + [AsyncIO(), lifecycle]
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        url=broker_url(settings), middleware=middleware,
        namespace=f"{settings.key_prefix}-dramatiq",
    )
    return broker, lifecycle


SETTINGS = Settings()
broker, lifecycle = build(SETTINGS)
dramatiq.set_broker(broker)
