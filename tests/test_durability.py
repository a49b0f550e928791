"""The start-up check of what the ledger Redis keeps on a crash (plumbing/durability.py):
reported loudly when it keeps less than REDIS_DURABILITY accepts, in /healthz's body, never
in its status."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from plumbing import durability
from plumbing.settings import Settings
from tests.conftest import RedisServer, started


@pytest_asyncio.fixture
async def own_redis() -> AsyncIterator[aioredis.Redis]:
    server = RedisServer(appendonly=False)
    server.start()
    client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()
    server.stop(kill=True)  # turned AOF on at run time: no final rewrite to wait for
    server.cleanup()


@pytest.mark.parametrize(("appendonly", "fsync", "accepted", "complaint"), [
    ("no", "always", "always", "AOF is off"),
    ("no", "always", "everysec", "AOF is off"),
    ("no", "always", "none", None),
    ("yes", "everysec", "always", "appendfsync is everysec"),
    ("yes", "everysec", "everysec", None),
    ("yes", "no", "everysec", "appendfsync is no"),
    ("yes", "always", "always", None),
])
async def test_a_redis_that_keeps_less_than_accepted_is_reported(
    own_redis: aioredis.Redis, appendonly: str, fsync: str, accepted: durability.Durability,
    complaint: str | None,
) -> None:
    await own_redis.config_set("appendfsync", fsync)
    await own_redis.config_set("appendonly", appendonly)
    problem = await durability.check(own_redis, accepted)
    if complaint is None:
        assert problem is None
    else:
        assert problem is not None and complaint in problem and "REDIS_DURABILITY" in problem


async def test_healthz_names_a_weak_redis_and_stays_200(settings: Settings) -> None:
    """The session's Redis runs without AOF; a server that accepts only "always" says so."""
    strict = settings.model_copy(update={"redis_durability": "always"})
    server, task, address = await started(strict)
    try:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://{address}/healthz")
        assert r.status_code == 200, r.text
        assert "AOF is off" in r.json()["redis_durability"]
    finally:
        server.should_exit = True
        await task
    relaxed_server, relaxed_task, relaxed = await started(settings)  # accepts "none"
    try:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://{relaxed}/healthz")
        assert r.status_code == 200 and "redis_durability" not in r.json(), r.text
    finally:
        relaxed_server.should_exit = True
        await relaxed_task
