"""The starlette application: routes, and the lifespan that owns every client.

``companions`` are what the process runs beside the game server on the same clients (the
launcher, :mod:`stakepro.app`, adds the in-process outbox persister of :mod:`workers`
this way): each is entered once :class:`Services` has started and exited before it closes,
in reverse order, so a companion still has Redis and PostgreSQL while it stops.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, WebSocketRoute
from starlette.staticfiles import StaticFiles

from plumbing.logs import configure_logging
from plumbing.settings import Settings
from server import api
from server.echo import echo_endpoint
from server.feed import feed_endpoint
from server.play import play_endpoint
from server.security import SecurityHeaders, content_security_policy, origin_checked
from server.services import Services
from server.wslink import RawAsgi

STATIC = Path(__file__).resolve().parent.parent / "static"

#: Something run beside the server for its lifetime, on its clients.
Companion = Callable[[Services], contextlib.AbstractAsyncContextManager[Any]]


def create_app(settings: Settings | None = None,
               companions: Sequence[Companion] = ()) -> Starlette:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_json)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = await Services.start(settings)
        app.state.services = services
        try:
            async with contextlib.AsyncExitStack() as running:
                for companion in companions:
                    await running.enter_async_context(companion(services))
                # Everything built so far lives as long as the process: move it out of the
                # cyclic collector's sight, so the full collections that the bet path's
                # allocations trigger do not walk it again each time (they show as p99
                # spikes: docs/benchmarks.md).
                gc.collect()
                gc.freeze()
                yield
        finally:
            await services.close()

    routes = [
        *api.routes(settings),
        WebSocketRoute("/ws/play", RawAsgi(origin_checked(play_endpoint))),
        WebSocketRoute("/ws/feed", RawAsgi(origin_checked(feed_endpoint))),
        *([WebSocketRoute("/debug/echo/ws/play", RawAsgi(echo_endpoint))]
          if settings.debug_echo else []),
        Mount("/", StaticFiles(directory=STATIC, html=True, check_dir=False), name="static"),
    ]
    policy = content_security_policy(STATIC)
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(SecurityHeaders, policy=policy)])
