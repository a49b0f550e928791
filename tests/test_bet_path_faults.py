"""The bet path when Redis misbehaves: a command that cannot be sent fails only its own
user's call, a Redis that stops answering turns into UNAVAILABLE (and a resend with the
same id settles the bet exactly once), and /healthz says so while it lasts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio
import redis.asyncio as aioredis

from games.errors import StakeProError, Unavailable
from games.money import parse_amount
from plumbing import scripts
from plumbing.settings import Settings
from server import users
from server.services import Services
from server.wallet import BetResult
from tests.conftest import ADMIN_TOKEN, RedisServer, serve
from tests.helpers import Api, eventually


@pytest_asyncio.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    own = settings.model_copy(update={"key_prefix": f"w{uuid.uuid4().hex[:6]}"})
    started = await Services.start(own)
    yield started
    await started.close()


async def _player(services: Services, deposit: str) -> int:
    user, _ = await users.create(services.pool, "player", None, None, 0)
    usdt = services.settings.currencies["USDT"]
    await services.wallet.deposit(
        user.user_id, usdt, parse_amount(deposit, usdt), uuid.uuid4().hex
    )
    return user.user_id


async def test_an_unsendable_bet_fails_only_its_own_call(services: Services) -> None:
    """Below the socket's id check (defence in depth): a bet whose idempotency key cannot be
    encoded reaches the wallet in the same pipeline as other users' bets. Its call answers
    UNAVAILABLE; every other bet settles with its own result; nothing shifts."""
    wallet = services.wallet
    spec = services.checker.check("USDT", "1.00", "50.00", "under").spec
    a_id, b_id, c_id = [await _player(services, "10.00") for _ in range(3)]
    a, b, c = wallet.user(a_id), wallet.user(b_id), wallet.user(c_id)
    for state in (a, b, c):
        await wallet.pair(state)

    async def bet(state: Any, client_id: str) -> BetResult | StakeProError:
        try:
            return await wallet.bet(state, client_id, spec, "test")
        except StakeProError as exc:
            return exc

    outcomes = await asyncio.wait_for(asyncio.gather(
        bet(b, "b1"), bet(a, "\ud800"), bet(c, "c1"), bet(b, "b2"), bet(c, "c2"),
    ), 10)
    b1, bad, c1, b2, c2 = outcomes
    assert isinstance(bad, Unavailable), bad
    for result, nonce in ((b1, 1), (b2, 2), (c1, 1), (c2, 2)):
        assert isinstance(result, BetResult), result
        assert result.nonce == nonce and not result.replay
    assert isinstance(b1, BetResult) and isinstance(c1, BetResult)
    assert b1.bet_id.split("-")[0] != c1.bet_id.split("-")[0]  # each its own user's pair
    # The refused bet moved nothing and used no nonce; its user bets on.
    after = await asyncio.wait_for(bet(a, "a1"), 10)
    assert isinstance(after, BetResult) and after.nonce == 1
    assert (await wallet.balances(a_id))["USDT"] == after.balance
    assert wallet.unanswered_for() == 0.0


@pytest_asyncio.fixture
async def pausable(settings: Settings) -> AsyncIterator[tuple[str, RedisServer]]:
    """A server with its own Redis, a short read timeout and a short stall threshold."""
    redis = RedisServer()
    redis.start()
    own = settings.model_copy(update={
        "redis_url": redis.url, "redis_read_timeout_s": 1.0, "health_stall_s": 0.3,
    })
    try:
        async with serve(own) as served:
            yield served.address, redis
    finally:
        redis.cleanup()


async def test_a_redis_that_stops_answering_bets(pausable: tuple[str, RedisServer]) -> None:
    """Redis answers pings but holds every script (CLIENT PAUSE WRITE): /healthz turns 503,
    the bet is answered UNAVAILABLE after the read timeout (not left hanging), and once
    Redis answers again the same id settles it exactly once."""
    address, redis = pausable
    control = aioredis.Redis.from_url(redis.url)
    async with Api(address, ADMIN_TOKEN) as api, httpx.AsyncClient(
        base_url=f"http://{address}"
    ) as http:
        uid, token = await api.player(deposit="10.00")
        async with api.play(token) as p:
            first = await p.bet("1.00", id="warm")
            assert first["type"] == "bet_result"
            assert (await http.get("/healthz")).status_code == 200

            await control.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
            try:
                await p.send({"type": "bet", "id": "held", "currency": "USDT",
                              "amount": "1.00", "target": "50.00", "direction": "under"})

                async def unhealthy() -> dict[str, Any] | None:
                    r = await http.get("/healthz")
                    return r.json() if r.status_code == 503 else None

                body = await eventually(unhealthy, within=5)
                assert body["bets"] == "stalled" and body["redis"] == "ok", body
                assert body["code"] == "UNAVAILABLE"
                reply = await asyncio.wait_for(p.recv(), 5)
                assert reply["type"] == "error" and reply["code"] == "UNAVAILABLE", reply
                assert reply["id"] == "held"
            finally:
                await control.execute_command("CLIENT", "UNPAUSE")

            again = await asyncio.wait_for(p.bet("1.00", id="held"), 10)
            assert again["type"] == "bet_result", again
            once_more = await asyncio.wait_for(p.bet("1.00", id="held"), 10)
            assert once_more["bet_id"] == again["bet_id"]  # the original result
            assert again["nonce"] == 2  # settled exactly once, after "warm"
            assert (await api.user(uid))["balances"]["USDT"] == once_more["balance"]

        async def healthy() -> bool:
            return (await http.get("/healthz")).status_code == 200

        await eventually(healthy, within=10)
    await control.aclose()


async def test_the_batched_calls_load_the_scripts_redis_forgot(services: Services) -> None:
    """A Redis without the scripts (SCRIPT FLUSH; a restarted one answers the same): a
    deposit and a rotation sent together through the Batcher meet NOSCRIPT, the scripts are
    loaded and the two calls sent again, and each applies exactly once."""
    wallet = services.wallet
    uid = await _player(services, "10.00")
    state = wallet.user(uid)
    await wallet.pair(state)
    await services.redis.script_flush()
    usdt = services.settings.currencies["USDT"]
    balance, rotation = await asyncio.wait_for(asyncio.gather(
        wallet.deposit(uid, usdt, parse_amount("5.00", usdt), uuid.uuid4().hex),
        wallet.rotate(state, "after-the-flush"),
    ), 10)
    assert balance == parse_amount("15.00", usdt)
    assert (await wallet.balances(uid))["USDT"] == balance
    assert rotation.current.client_seed == "after-the-flush" and rotation.current.nonce == 0
    assert await services.redis.hget(services.keys.seed(uid), "pid") == (
        rotation.current.pid.encode())
    assert all(await services.redis.script_exists(*(s.sha for s in scripts.ALL)))
