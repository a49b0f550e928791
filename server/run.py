"""``make run``: migrate, start the server (and, once they exist, the workers), print the URL.

Runs until interrupted; Ctrl-C stops everything this command started.
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn

from server.app import create_app
from server.db import migrate
from server.settings import Settings


def uvicorn_config(settings: Settings, **overrides: object) -> uvicorn.Config:
    """The one uvicorn configuration: uvloop, httptools, sans-I/O websockets, no deflate."""
    options: dict[str, object] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": "httptools",
        "ws": "websockets-sansio",
        "ws_max_size": settings.max_frame_bytes,
        "ws_per_message_deflate": False,
        "lifespan": "on",
        "log_level": "warning",
        "access_log": False,
    }
    options.update(overrides)
    return uvicorn.Config(create_app(settings), **options)  # type: ignore[arg-type]


def main() -> int:
    settings = Settings()
    applied = asyncio.run(migrate(settings.database_url))
    if applied:
        print(f"migrated: {', '.join(applied)}")
    if settings.admin_token_is_default:
        print("ADMIN_TOKEN not set: using the development token 'dev-admin-token'")
    server = uvicorn.Server(uvicorn_config(settings))

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        # uvicorn offers no "started" event to wait on.
        while not server.started and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if server.started:
            print(f"StakePro is up: http://{settings.host}:{settings.port}/  (demo mode: "
                  f"{'on' if settings.demo_mode else 'off'}; Ctrl-C stops it)", flush=True)
        await task

    import uvloop

    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
