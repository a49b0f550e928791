"""The outbox cannot grow without bound while nothing persists it (workers down): past
OUTBOX_MAX_LEN entries, bet-n.lua and deposit-4.lua refuse with UNAVAILABLE and change
nothing, /healthz answers 503 ``"outbox": "full"`` and /metrics shows the full buckets. No
entry is ever trimmed: once the workers drain it, bets pass again and a resent bet settles
once."""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from plumbing.keys import Keys
from plumbing.settings import Settings
from tests.conftest import ADMIN_TOKEN, serve
from tests.helpers import Api

CAP = 4


async def test_a_full_outbox_refuses_bets_and_deposits_and_says_so(settings: Settings) -> None:
    own = settings.model_copy(update={
        "key_prefix": f"x{uuid.uuid4().hex[:6]}", "buckets": 1, "outbox_max_len": CAP,
        "inprocess_persister": False,  # the workers are "down": nothing drains the outbox
    })
    keys = Keys(own.key_prefix, own.buckets)
    client = aioredis.Redis.from_url(own.redis_url)
    async with serve(own) as served:
        address = served.address
        async with Api(address, ADMIN_TOKEN) as api:
            uid, token = await api.player(deposit="10.00")  # one entry
            async with api.play(token) as p:
                for i in range(CAP - 1):
                    assert (await api.http.get("/healthz")).status_code == 200
                    assert (await p.bet("1.00", id=f"b{i}"))["type"] == "bet_result"
                assert await client.xlen(keys.outbox(0)) == CAP
                before = (await api.user(uid))["balances"]["USDT"]

                refused = await p.bet("1.00", id="over")
                assert refused["type"] == "error" and refused["code"] == "UNAVAILABLE"
                r = await api.http.post("/api/admin/deposits", json={
                    "user_id": uid, "currency": "USDT", "amount": "5.00",
                    "idempotency_key": "dep-over"})
                assert r.status_code == 503 and r.json()["code"] == "UNAVAILABLE"
                # Nothing changed: balance, nonce, outbox.
                assert (await api.user(uid))["balances"]["USDT"] == before
                assert await client.xlen(keys.outbox(0)) == CAP
                assert await client.hget(keys.seed(uid), "n") == str(CAP - 1).encode()

                r = await api.http.get("/healthz")
                assert r.status_code == 503, r.text
                assert r.json()["outbox"] == "full" and r.json()["code"] == "UNAVAILABLE"
                metrics = (await api.http.get("/metrics")).text
                assert "stakepro_outbox_full_buckets 1.0" in metrics
                assert f"stakepro_outbox_longest_entries {CAP}.0" in metrics

                # The workers persist the entries (here: acknowledged and deleted by hand,
                # as outbox-ack-accrue-n.lua does): bets pass again.
                ids = [e[0] for e in await client.xrange(keys.outbox(0))]
                await client.xdel(keys.outbox(0), *ids)
                assert (await api.http.get("/healthz")).status_code == 200
                settled = await p.bet("1.00", id="over")
                assert settled["type"] == "bet_result" and settled["nonce"] == CAP
                assert (await p.bet("1.00", id="over"))["bet_id"] == settled["bet_id"]
                r = await api.http.post("/api/admin/deposits", json={
                    "user_id": uid, "currency": "USDT", "amount": "5.00",
                    "idempotency_key": "dep-over"})
                assert r.status_code == 200, r.text
                assert await client.xlen(keys.outbox(0)) == 2
                metrics = (await api.http.get("/metrics")).text
                assert "stakepro_outbox_full_buckets 0.0" in metrics
        await client.aclose()


async def test_no_limit_when_zero(settings: Settings) -> None:
    own = settings.model_copy(update={
        "key_prefix": f"y{uuid.uuid4().hex[:6]}", "buckets": 1, "outbox_max_len": 0,
        "inprocess_persister": False,
    })
    async with serve(own) as served:
        address = served.address
        async with Api(address, ADMIN_TOKEN) as api:
            _, token = await api.player(deposit="10.00")
            async with api.play(token) as p:
                for i in range(CAP + 2):
                    assert (await p.bet("1.00", id=i))["type"] == "bet_result"
            assert (await api.http.get("/healthz")).status_code == 200
