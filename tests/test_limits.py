"""Rate and concurrency limits (server/limits.py, lua/rate-1.lua, lua/hold-1.lua) on a real
Redis and real servers: per client address (demo, sign-in, admin API) and per user across
sockets and server instances (sockets open, bets and messages a second). A limit hit is
RATE_LIMITED (HTTP 429 with Retry-After) and changes nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest_asyncio
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from plumbing import scripts
from plumbing.settings import Settings
from tests.conftest import ADMIN_TOKEN, RedisServer, serve
from tests.helpers import Api, Player, eventually

#: The per-user meter refuses once Redis has answered a charge, and frames keep being
#: served meanwhile (server/limits.py): the overshoot is what arrives within a charge's
#: round trip. The clients below send one frame per PACE_S (50 a second, far over the
#: limit of 1 a second but slower than a round trip), so at most a few pass the burst.
PACE_S = 0.02
LAG = 6
#: The tight limits of these tests' servers; everything else as the other tests have it.
LIMITS: dict[str, Any] = {
    "demo_per_minute": 1.0, "demo_burst": 2,
    "signin_per_minute": 1.0, "signin_burst": 3,
    "admin_per_minute": 1.0, "admin_burst": 5,
    "user_max_sockets": 2,
    "user_bets_per_s": 1.0, "user_bets_burst": 3,
    "user_messages_per_s": 1.0, "user_messages_burst": 6,
}


@pytest_asyncio.fixture(scope="module")
async def pair(settings: Settings) -> AsyncIterator[tuple[Settings, str, str]]:
    """Two server instances on one Redis and one database, with the limits above."""
    own = settings.model_copy(update={**LIMITS, "key_prefix": f"l{uuid.uuid4().hex[:6]}"})
    async with serve(own) as a, serve(own) as b:
        yield own, a.address, b.address


async def reset_rates(own: Settings) -> None:
    """Every rate limit of the shared servers whole again."""
    client = aioredis.Redis.from_url(own.redis_url)
    async for key in client.scan_iter(f"{own.key_prefix}:rate:*"):
        await client.delete(key)
    await client.aclose()


@pytest_asyncio.fixture
async def fresh_limits(pair: tuple[Settings, str, str]) -> None:
    await reset_rates(pair[0])


async def test_demo_is_limited_per_address_with_retry_after(
    pair: tuple[Settings, str, str], fresh_limits: None, database_url: str
) -> None:
    _, address, _ = pair
    db = await asyncpg.connect(database_url)
    try:
        async with httpx.AsyncClient(base_url=f"http://{address}") as http:
            for _ in range(LIMITS["demo_burst"]):
                assert (await http.post("/api/demo")).status_code == 200
            users = await db.fetchval("SELECT count(*) FROM users")
            r = await http.post("/api/demo")
            assert r.status_code == 429, r.text
            assert r.json()["code"] == "RATE_LIMITED"
            assert 1 <= int(r.headers["retry-after"]) <= 60
            assert await db.fetchval("SELECT count(*) FROM users") == users
    finally:
        await db.close()


async def test_admin_api_is_limited_per_address_even_for_wrong_tokens(
    pair: tuple[Settings, str, str], fresh_limits: None
) -> None:
    _, address, _ = pair
    async with httpx.AsyncClient(base_url=f"http://{address}") as http:
        wrong = {"Authorization": "Bearer guess"}
        for _ in range(LIMITS["admin_burst"]):
            assert (await http.get("/api/admin/users/1", headers=wrong)).status_code == 401
        r = await http.get("/api/admin/users/1", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 429 and r.json()["code"] == "RATE_LIMITED"
        assert int(r.headers["retry-after"]) >= 1


async def test_sign_in_attempts_are_limited_per_address(
    pair: tuple[Settings, str, str], fresh_limits: None
) -> None:
    _, address, _ = pair
    async with Api(address, ADMIN_TOKEN) as api:
        _, token = await api.player()
        await reset_rates(pair[0])
        for _ in range(LIMITS["signin_burst"] - 1):
            async with api.play() as p:
                await p.send({"type": "auth", "token": "not-a-token"})
                assert (await p.recv())["code"] == "UNAUTHORIZED"
        async with api.play(token):
            pass  # the last attempt of the burst, with a good token
        async with api.play() as p:
            await p.send({"type": "auth", "token": token})
            error = await p.recv()
            assert error["type"] == "error" and error["code"] == "RATE_LIMITED", error


async def test_sockets_open_per_user_across_instances(
    pair: tuple[Settings, str, str], fresh_limits: None
) -> None:
    _, address_a, address_b = pair
    async with Api(address_a, ADMIN_TOKEN) as api_a, Api(address_b, ADMIN_TOKEN) as api_b:
        _, token = await api_a.player()
        async with api_a.play(token), api_b.play(token):
            async with api_b.play() as third:
                await third.send({"type": "auth", "token": token})
                error = await third.recv()
                assert error["code"] == "RATE_LIMITED" and "sockets open" in error["message"]
        # Both closed: their places are free again.
        async def opens() -> bool:
            await reset_rates(pair[0])  # sign-ins are limited per address too
            async with api_b.play() as p:
                await p.send({"type": "auth", "token": token})
                return (await p.recv())["type"] == "welcome"

        assert await eventually(opens, within=5)


async def test_bets_a_second_per_user_across_instances(
    pair: tuple[Settings, str, str], fresh_limits: None
) -> None:
    _, address_a, address_b = pair
    async with Api(address_a, ADMIN_TOKEN) as api_a, Api(address_b, ADMIN_TOKEN) as api_b:
        uid, token = await api_a.player(deposit="100.00")
        async with api_a.play(token) as a, api_b.play(token) as b:
            settled: list[dict[str, Any]] = []
            refused: dict[str, Any] | None = None
            for i in range(200):
                await asyncio.sleep(PACE_S)  # the client's sending rate, not a wait for state
                reply = await (a if i % 2 == 0 else b).bet("1.00", "50.00", "under")
                if reply["type"] == "bet_result":
                    settled.append(reply)
                    continue
                refused = reply
                break
            assert refused is not None and refused["code"] == "RATE_LIMITED", settled
            # The refusal follows Redis's answer to a charge (see LAG).
            assert LIMITS["user_bets_burst"] <= len(settled) <= LIMITS["user_bets_burst"] + LAG
            # It changed nothing: the balance is the last settled bet's, the nonce unused.
            view = await api_a.user(uid)
            assert view["balances"]["USDT"] == settled[-1]["balance"]

            async def passes() -> dict[str, Any] | None:
                reply = await a.bet("1.00", "50.00", "under")
                return reply if reply["type"] == "bet_result" else None

            # Within the rate again, bets pass; the refused ones used no nonce.
            later = await eventually(passes, within=5, every=0.3)
            assert later["nonce"] == len(settled) + 1


async def test_messages_a_second_per_user_across_instances(
    pair: tuple[Settings, str, str], fresh_limits: None
) -> None:
    _, address_a, address_b = pair
    async with Api(address_a, ADMIN_TOKEN) as api_a, Api(address_b, ADMIN_TOKEN) as api_b:
        _, token = await api_a.player()
        async with api_a.play(token) as a, api_b.play(token) as b:
            answers = []
            for i in range(200):
                await asyncio.sleep(PACE_S)  # the client's sending rate, not a wait for state
                reply = await (a if i % 2 == 0 else b).request({"type": "ping", "id": i})
                answers.append(reply["type"] if reply["type"] == "pong" else reply["code"])
                if reply["type"] != "pong":
                    break
            assert answers[-1] == "RATE_LIMITED"
            pongs = answers.count("pong")
            assert LIMITS["user_messages_burst"] <= pongs <= LIMITS["user_messages_burst"] + LAG
            # Both instances refuse now (each once its own charge has been answered).
            for p in (a, b):
                async def refuses(p: Player = p) -> bool:
                    reply = await p.request({"type": "ping", "id": "again"})
                    return reply.get("code") == "RATE_LIMITED"

                assert await eventually(refuses, within=1, every=0.01)


# -- the script itself ----------------------------------------------------------------------


@hsettings(max_examples=40, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(burst=st.integers(1, 20), costs=st.lists(st.integers(1, 5), min_size=1, max_size=30))
def test_rate_script_never_lets_more_than_the_burst_through_at_once(
    redis_server: RedisServer, burst: int, costs: list[int]
) -> None:
    """At a rate far too slow to refill during the test, what passes never exceeds the
    burst; a refused check takes nothing (the next request that fits still passes); a
    charge is always taken."""

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        key = f"prop:rate:{uuid.uuid4().hex}"
        interval = str(3600 * 10**6)  # one unit an hour
        taken = 0
        try:
            for cost in costs:
                allowed, retry_ms = await scripts.run_one(
                    client, scripts.RATE, (key,), (interval, str(burst), str(cost), "check"))
                assert bool(allowed) == (taken + cost <= burst)
                if allowed:
                    taken += cost
                    assert retry_ms == 0
                else:
                    assert retry_ms > 0
            allowed, _ = await scripts.run_one(
                client, scripts.RATE, (key,), (interval, str(burst), "1", "charge"))
            assert bool(allowed) == (taken + 1 <= burst)
            allowed, _ = await scripts.run_one(
                client, scripts.RATE, (key,), (interval, str(burst), "0", "check"))
            assert bool(allowed) == (taken + 1 <= burst)
        finally:
            await client.delete(key)
            await client.aclose()

    asyncio.run(scenario())


@hsettings(max_examples=40, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(places=st.integers(1, 4),
       steps=st.lists(st.tuples(st.sampled_from(["take", "release"]), st.integers(0, 6)),
                      min_size=1, max_size=30))
def test_hold_script_never_gives_more_places_than_there_are(
    redis_server: RedisServer, places: int, steps: list[tuple[str, int]]
) -> None:
    """Against a plain set as the model: a holder keeps (renews) its place, a new one gets
    a place only while fewer than ``places`` are held, a release frees one."""

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        key = f"prop:hold:{uuid.uuid4().hex}"
        held: set[str] = set()
        try:
            for op, n in steps:
                holder = f"s{n}"
                if op == "release":
                    await client.zrem(key, holder)
                    held.discard(holder)
                    continue
                ok, count = await scripts.run_one(
                    client, scripts.HOLD, (key,), (holder, "60000", str(places)))
                expected = holder in held or len(held) < places
                assert bool(ok) == expected
                if ok:
                    held.add(holder)
                assert count == len(held)
                assert await client.zcard(key) == len(held) <= places
        finally:
            await client.delete(key)
            await client.aclose()

    asyncio.run(scenario())


async def test_places_of_a_vanished_holder_come_free(redis_server: RedisServer) -> None:
    """A holder that stops renewing (its instance died) loses its place when it expires."""
    client = aioredis.Redis.from_url(redis_server.url)
    key = f"prop:hold:{uuid.uuid4().hex}"
    try:
        held, _ = await scripts.run_one(client, scripts.HOLD, (key,), ("dead", "200", "1"))
        assert held == 1
        refused, _ = await scripts.run_one(client, scripts.HOLD, (key,), ("new", "200", "1"))
        assert refused == 0

        async def free() -> bool:
            ok, _ = await scripts.run_one(client, scripts.HOLD, (key,), ("new", "200", "1"))
            return bool(ok)

        assert await eventually(free, within=3)
        assert await client.zrange(key, 0, -1) == [b"new"]
    finally:
        await client.delete(key)
        await client.aclose()
