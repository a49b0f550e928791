"""The starlette application: routes, and the lifespan that owns every client."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Mount, WebSocketRoute
from starlette.staticfiles import StaticFiles

from server import api
from server.echo import echo_endpoint
from server.feed import feed_endpoint
from server.logs import configure_logging
from server.play import play_endpoint
from server.services import Services
from server.settings import Settings
from server.wslink import RawAsgi

STATIC = Path(__file__).resolve().parent.parent / "static"


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_json)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = await Services.start(settings)
        app.state.services = services
        # Everything built so far lives as long as the process: move it out of the cyclic
        # collector's sight, so the full collections that the bet path's allocations
        # trigger do not walk it again each time (they showed as p99 spikes).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await services.close()

    routes = [
        *api.routes(settings),
        WebSocketRoute("/ws/play", RawAsgi(play_endpoint)),
        WebSocketRoute("/ws/feed", RawAsgi(feed_endpoint)),
        *([WebSocketRoute("/debug/echo/ws/play", RawAsgi(echo_endpoint))]
          if settings.debug_echo else []),
        Mount("/", StaticFiles(directory=STATIC, html=True, check_dir=False), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
