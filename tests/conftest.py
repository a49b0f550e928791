"""Real servers for the tests: our own redis-server on a free port, our own PostgreSQL
database on the PostgreSQL server at TEST_DATABASE_URL / DATABASE_URL (default
postgresql://root@127.0.0.1:5432), and the StakePro app served by uvicorn on a free port.
Everything is removed at the end of the session."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvicorn

from plumbing.settings import Settings
from server.db import drop_database, migrate
from server.wslink import DirectProtocol
from stakepro.app import create_app
from tests.helpers import Api

ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process of the tests' own (killable, restartable)."""

    def __init__(self, appendonly: bool = False, appendfsync: str = "always") -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="stakepro-redis-"))
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.dir), "--appendonly", "yes" if self.appendonly else "no",
             "--appendfsync", self.appendfsync],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            import time

            time.sleep(0.025)
        raise RuntimeError("redis-server did not start")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    base = os.environ.get("TEST_DATABASE_URL") or os.environ.get(
        "DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres"
    )
    dsn = base.rsplit("/", 1)[0] + f"/stakepro_test_{os.getpid()}"
    asyncio.run(migrate(dsn))
    yield dsn
    asyncio.run(drop_database(dsn))


@pytest.fixture(scope="session")
def settings(redis_server: RedisServer, database_url: str) -> Settings:
    return Settings(
        redis_url=redis_server.url,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        key_prefix=f"t{uuid.uuid4().hex[:6]}",
        log_level="warning",
        redis_durability="none",  # the session's Redis keeps no AOF: speed, on purpose
    )


async def serve(
    settings: Settings, ws: Any = DirectProtocol
) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    """Run the app in this event loop on a free port; returns (server, task, base URL).
    ``ws``: uvicorn's WebSocket protocol (ours by default; "websockets-sansio" is plain
    ASGI, served through server.wslink.AsgiLink)."""
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=free_port(), log_level="warning",
        ws=ws, ws_max_size=settings.max_frame_bytes,
        ws_per_message_deflate=False, lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return server, task, f"127.0.0.1:{config.port}"


@pytest_asyncio.fixture(scope="session")
async def base(settings: Settings) -> AsyncIterator[str]:
    """host:port of a StakePro server shared by the session's tests."""
    server, task, address = await serve(settings)
    yield address
    server.should_exit = True
    await task


@pytest_asyncio.fixture(scope="session")
async def api(base: str) -> AsyncIterator[Api]:
    async with Api(base, ADMIN_TOKEN) as client:
        yield client
