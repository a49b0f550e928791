"""Safe defaults of a deployment (issue 10, part 3): what ``python -m stakepro`` starts with
when nothing is set, what ``make run`` turns on for the local demo, and the Redis check at
start (docs/security.md)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from plumbing.settings import Settings
from server.services import Services, UnsafeRedis
from stakepro.run import banner
from tests.conftest import ADMIN_TOKEN, RedisServer, serve

REPO = Path(__file__).resolve().parent.parent


def test_nothing_set_means_admin_closed_and_demo_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ADMIN_TOKEN", "DEMO_MODE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.admin_token == "" and not settings.admin_open
    assert settings.demo_mode is False
    lines = banner(settings)
    assert "admin API: closed (set ADMIN_TOKEN to open it)" in lines
    assert any(line.startswith("demo mode: off") for line in lines)

    monkeypatch.setenv("ADMIN_TOKEN", "a-token-of-the-operator")
    monkeypatch.setenv("DEMO_MODE", "true")
    opened = Settings()
    assert opened.admin_open and opened.demo_mode
    assert any(line.startswith("admin API: open") for line in banner(opened))
    assert any(line.startswith("demo mode: on") for line in banner(opened))


def _make_run_recipe(env: dict[str, str]) -> str:
    """The shell lines ``make run`` would execute (make -n prints and runs none of them)."""
    out = subprocess.run(["make", "-n", "run"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout
    return out


def _announcements(recipe: str) -> str:
    return "\n".join(line for line in recipe.splitlines() if 'echo "make run:' in line)


def test_make_run_sets_both_and_says_so() -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("ADMIN_TOKEN", "DEMO_MODE")}
    recipe = _make_run_recipe(base)
    assert 'ADMIN_TOKEN="${ADMIN_TOKEN:-dev-admin-token}"' in recipe
    assert 'DEMO_MODE="${DEMO_MODE:-true}"' in recipe
    # The lines that announce it, run as make runs them (bash, without the variables).
    said = subprocess.run(
        ["bash", "-c", _announcements(recipe)],
        env=base, capture_output=True, text=True, check=True,
    ).stdout
    assert "ADMIN_TOKEN not set: using 'dev-admin-token'" in said
    assert "DEMO_MODE=true" in said
    # What the operator set is kept, and then nothing is announced.
    said = subprocess.run(
        ["bash", "-c", _announcements(recipe)],
        env={**base, "ADMIN_TOKEN": "mine", "DEMO_MODE": "false"}, capture_output=True,
        text=True, check=True,
    ).stdout
    assert said == ""


async def test_a_server_with_the_defaults_keeps_admin_and_demo_closed(
    redis_server: RedisServer, database_url: str
) -> None:
    own = Settings(redis_url=redis_server.url, database_url=database_url,
                   key_prefix=f"d{uuid.uuid4().hex[:6]}", log_level="warning")
    async with serve(own) as served:
        address = served.address
        async with httpx.AsyncClient(base_url=f"http://{address}") as http:
            for headers in ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, {},
                            {"Authorization": "Bearer dev-admin-token"}):
                r = await http.post("/api/admin/users", json={"role": "player"},
                                    headers=headers)
                assert r.status_code == 403, r.text
                assert r.json()["code"] == "FORBIDDEN"
                assert "ADMIN_TOKEN" in r.json()["message"]
            r = await http.post("/api/demo")
            assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"
            assert (await http.get("/healthz")).status_code == 200


async def test_redis_that_may_evict_is_refused_at_start(settings: Settings) -> None:
    redis = RedisServer()
    redis.start()
    client = aioredis.Redis.from_url(redis.url)
    try:
        own = settings.model_copy(update={"redis_url": redis.url})
        for policy in ("allkeys-lru", "volatile-lru", "allkeys-random", "volatile-ttl"):
            await client.config_set("maxmemory-policy", policy)
            with pytest.raises(UnsafeRedis, match=f"maxmemory-policy is '{policy}'"):
                await Services.start(own)
        await client.config_set("maxmemory-policy", "noeviction")
        services = await Services.start(own)
        await services.close()
    finally:
        await client.aclose()
        redis.cleanup()
