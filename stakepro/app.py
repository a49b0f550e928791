"""The game server's app with what the launcher runs beside it in the same process.

:func:`create_app` is :func:`server.app.create_app` plus, while
``settings.inprocess_persister``, the outbox persister of :mod:`workers.persister` (with its
commission flush loop) on the server's own Redis client and PostgreSQL pool. ``make run``
turns it off and runs the Dramatiq workers instead; a server started alone
(``python -m stakepro serve``) and the tests keep it on.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from plumbing.settings import Settings
from server import app
from server.services import Services
from workers.persister import Persister


@contextlib.asynccontextmanager
async def persister(services: Services) -> AsyncIterator[Persister]:
    """The in-process persister of one server process, closed before the server's clients."""
    running = Persister(
        services.redis,
        services.pool, services.keys, services.instance,
        commission_flush_s=services.settings.commission_flush_s,
    )
    running.start()
    try:
        yield running
    finally:
        await running.close()  # it needs Redis and the pool to flush what is left


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()
    return app.create_app(settings, [persister] if settings.inprocess_persister else [])
