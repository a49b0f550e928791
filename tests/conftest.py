"""Real servers for the tests: our own redis-server on a free port, our own PostgreSQL
database on the PostgreSQL server at TEST_DATABASE_URL / DATABASE_URL (default
postgresql://root@127.0.0.1:5432), and the StakePro app served by uvicorn on a free port.
Everything is removed at the end of the session.

Besides the session's shared server (``base``, ``api``): servers, Redis and databases a test
may break (``own_redis``, ``aof_redis``, ``own_database``, :func:`serve`), a Redis Cluster
(``redis_cluster``, tests/rediscluster.py), the deployment of
real worker processes of tests/workerprocs.py (``stack``, ``stack_api``, ``stack_pool``),
Chromium for the page tests (``chromium_path``) and the seed of a test's random choices
(``seeded``). docs/testing.md says which to use when."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import uvicorn

from plumbing.settings import Settings
from server.db import drop_database, migrate
from server.wslink import DirectProtocol
from stakepro.app import create_app
from tests.helpers import Api, redis_pongs

if TYPE_CHECKING:
    from tests.rediscluster import RedisCluster
    from tests.workerprocs import Stack

ADMIN_TOKEN = "test-admin-token"
CHROMIUM = "/usr/bin/chromium"

#: What the tests' servers need on purpose (the defaults keep these closed or low): the
#: admin API, demo mode, and limits far above what one test machine sends from 127.0.0.1.
#: Tests of the limits and defaults build settings without them.
TEST_SETTINGS: dict[str, Any] = {
    "admin_token": ADMIN_TOKEN,
    "demo_mode": True,
    "demo_per_minute": 1e9, "demo_burst": 10**9,
    "signin_per_minute": 1e9, "signin_burst": 10**9,
    "admin_per_minute": 1e9, "admin_burst": 10**9,
    "user_max_sockets": 10**6,
    "user_bets_per_s": 1e9, "user_bets_burst": 10**9,
    "user_messages_per_s": 1e9, "user_messages_burst": 10**9,
    # One socket betting in a closed loop passes 2,000 messages/s on a quiet machine.
    "rate_per_socket": 1e9, "rate_burst": 10**9,
}


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
            if redis_pongs(self.port):
                return
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


def running_redis(appendonly: bool = False) -> Iterator[RedisServer]:
    server = RedisServer(appendonly)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    yield from running_redis()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to kill or restart."""
    yield from running_redis()


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own with its AOF on (appendfsync everysec)."""
    yield from running_redis(appendonly=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A real Redis Cluster (3 masters, 3 replicas on loopback, tests/rediscluster.py),
    started once for the session by the first test that asks for it."""
    from tests.rediscluster import RedisCluster

    cluster = RedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest_asyncio.fixture
async def cluster_settings(redis_cluster: RedisCluster) -> AsyncIterator[Settings]:
    """Settings on the session's Redis Cluster (``REDIS_URL`` names its second node: any
    node will do) and a migrated database of this test's own, under a fresh key prefix
    whose keys are deleted from every master afterwards."""
    from plumbing.redisclient import open_client, scan_keys

    dsn = database_named(fresh_database_name("cl"))
    await migrate(dsn)
    settings = Settings(
        redis_url=redis_cluster.nodes[1].url, database_url=dsn,
        key_prefix=f"c{uuid.uuid4().hex[:6]}", log_level="warning", **TEST_SETTINGS,
        redis_durability="none",  # the test cluster keeps no AOF: speed, on purpose
    )
    try:
        yield settings
    finally:
        client = await open_client(settings.redis_url)
        try:
            async for key in scan_keys(client, f"{settings.key_prefix}:*"):
                await client.delete(key)
        finally:
            await client.aclose()
        await drop_database(dsn)


def database_named(name: str) -> str:
    """The URL of database ``name`` on the tests' PostgreSQL server."""
    base = os.environ.get("TEST_DATABASE_URL") or os.environ.get(
        "DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres"
    )
    return base.rsplit("/", 1)[0] + f"/{name}"


def fresh_database_name(tag: str) -> str:
    return f"stakepro_{tag}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    dsn = database_named(f"stakepro_test_{os.getpid()}")
    asyncio.run(migrate(dsn))
    yield dsn
    asyncio.run(drop_database(dsn))


@pytest_asyncio.fixture
async def own_database() -> AsyncIterator[str]:
    """A migrated database of this test's own (so an unscoped audit judges only its
    rows), dropped afterwards."""
    dsn = database_named(fresh_database_name("own"))
    await migrate(dsn)
    yield dsn
    await drop_database(dsn)


@pytest.fixture(scope="session")
def settings(redis_server: RedisServer, database_url: str) -> Settings:
    return Settings(
        redis_url=redis_server.url,
        database_url=database_url,
        key_prefix=f"t{uuid.uuid4().hex[:6]}",
        log_level="warning",
        **TEST_SETTINGS,
        redis_durability="none",  # the session's Redis keeps no AOF: speed, on purpose
    )


@dataclass(frozen=True)
class Served:
    address: str  # host:port
    server: uvicorn.Server


@pytest_asyncio.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A client of the session's Redis (bytes replies)."""
    client = aioredis.Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the session's database (modules with a stack of their own override it)."""
    p = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    yield p
    await p.close()


async def started(
    settings: Settings, ws: Any = DirectProtocol
) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    """Run the app in this event loop on a free port; returns (server, its task, address).
    The caller stops it (``server.should_exit = True; await task``): for tests that stop or
    restart it at a point of their own; :func:`serve` otherwise.
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


@asynccontextmanager
async def serve(settings: Settings, ws: Any = DirectProtocol) -> AsyncIterator[Served]:
    """Run the app in this event loop on a free port until the block ends (the lifespan's
    shutdown included: the in-process persister drains what is left)."""
    server, task, address = await started(settings, ws)
    try:
        yield Served(address, server)
    finally:
        # A socket whose handler never ends (a stalled client) would hold the shutdown: after
        # 10 s the wait is cut short.
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), 10)
        except TimeoutError:
            server.force_exit = True
            await asyncio.wait_for(task, 20)


@pytest_asyncio.fixture(scope="session")
async def base(settings: Settings) -> AsyncIterator[str]:
    """host:port of a StakePro server shared by the session's tests."""
    async with serve(settings) as served:
        yield served.address


@pytest_asyncio.fixture(scope="session")
async def api(base: str) -> AsyncIterator[Api]:
    async with Api(base, ADMIN_TOKEN) as client:
        yield client


# -- real worker processes (tests/workerprocs.py) ----------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A Redis and a database of the module's own, for worker processes it starts."""
    from tests.workerprocs import Stack

    s = await Stack.create(tmp_path_factory.mktemp("stack"))
    yield s
    await s.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack_api(stack: Stack) -> AsyncIterator[Api]:
    """A game server in this process with the in-process persister off: only workers persist."""
    async with serve(stack.settings) as served, Api(served.address, ADMIN_TOKEN) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack_pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(stack.settings.database_url, min_size=1, max_size=2)
    yield p
    await p.close()


# -- the browser --------------------------------------------------------------------------------


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing; never a silent skip."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is not None:
        for command in ([apt, "update"], [apt, "install", "-y", "chromium"]):
            subprocess.run(command, check=False, timeout=900,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing and `apt-get install -y chromium` could not install it "
                    "(run `scripts/devenv.sh browser` as root, or install Debian's chromium)")
    return CHROMIUM


@pytest.fixture(scope="session")
def chromium_path() -> str:
    return ensure_chromium()


# -- randomness a failure can replay ------------------------------------------------------------


@pytest.fixture
def seeded() -> Iterator[random.Random]:
    """The random source of a test's fault points: seeded from STAKEPRO_TEST_SEED, or a new
    seed that is printed, so a failing run shows it (pytest prints a failing test's output)
    and ``STAKEPRO_TEST_SEED=<seed>`` replays the same choices."""
    seed = int(os.environ.get("STAKEPRO_TEST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nrandom seed: STAKEPRO_TEST_SEED={seed}")
    yield random.Random(seed)


@contextlib.asynccontextmanager
async def fresh_database(like: str) -> AsyncIterator[str]:
    """A migrated database of its own on the server of ``like``, dropped at the end: for
    tests whose commission flushes must not pay (or be paid by) anyone else's bets, since a
    flush pays every due bet of its database."""
    dsn = like.rsplit("/", 1)[0] + f"/stakepro_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await migrate(dsn)
    try:
        yield dsn
    finally:
        await drop_database(dsn)


def own_settings(redis_url: str, database_url: str) -> Settings:
    """Settings on these servers under a fresh key prefix, with the tests' limits."""
    return Settings(redis_url=redis_url, database_url=database_url,
                    key_prefix=f"g{uuid.uuid4().hex[:6]}", log_level="warning", **TEST_SETTINGS)
