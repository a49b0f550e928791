"""The player socket over a real connection: sign-in, bets, replays, pushes, encodings."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
import redis.asyncio as aioredis

from games import dice, seeds
from plumbing.keys import Keys
from plumbing.settings import Settings
from tests.helpers import Api, assert_refused_then_closed


async def test_welcome_lists_every_currency_and_the_seed_commitment(api: Api) -> None:
    _, token = await api.player(deposit="12.34")
    async with api.play(token) as p:
        w = p.welcome
        assert w["balances"] == {"USDT": "12.34", "BTC": "0.00000000"}
        assert w["seed"]["nonce"] == 0
        assert len(w["seed"]["server_seed_hash"]) == 64
        assert 1 <= len(w["seed"]["client_seed"]) <= 64


async def test_bet_result_is_consistent_with_the_rules(api: Api) -> None:
    _, token = await api.player(deposit="100.00")
    async with api.play(token) as p:
        r = await p.bet("10.00", "49.50", "over", id="first")
        assert r["type"] == "bet_result" and r["id"] == "first"
        assert r["multiplier"] == "1.9605" and r["nonce"] == 1
        roll = int(r["roll"].replace(".", ""))
        assert r["win"] == (roll > 4950)
        assert r["payout"] == ("19.60" if r["win"] else "0.00")
        assert r["balance"] == ("109.60" if r["win"] else "90.00")
        assert r["server_seed_hash"] == p.welcome["seed"]["server_seed_hash"]


async def test_msgpack_frames_get_msgpack_answers(api: Api) -> None:
    _, token = await api.player(deposit="1.00")
    async with api.play(token, msgpack_frames=True) as p:
        assert p.welcome["type"] == "welcome"
        await p.send({"type": "ping", "id": 7})
        assert p.ws is not None
        frame = await p.ws.recv()
        assert isinstance(frame, bytes)
        assert msgpack.unpackb(frame) == {"type": "pong", "id": 7}


async def test_answers_follow_each_frame_encoding(api: Api) -> None:
    _, token = await api.player(deposit="1.00")
    async with api.play(token) as p:
        assert p.ws is not None
        await p.ws.send(msgpack.packb({"type": "ping", "id": "m"}))
        assert isinstance(await p.ws.recv(), bytes)
        await p.ws.send(json.dumps({"type": "ping", "id": "j"}))
        assert isinstance(await p.ws.recv(), str)


async def test_same_id_replays_the_result_on_any_socket_and_moves_no_money(api: Api) -> None:
    uid, token = await api.player(deposit="10.00")
    async with api.play(token) as a, api.play(token) as b:
        first = await a.bet("1.00", "50.00", id="abc")
        again = await b.bet("1.00", "50.00", id="abc")
        assert again == first
        user = await api.user(uid)
        assert user["balances"]["USDT"] == first["balance"]
        # 1 and "1" are different ids
        one_int = await a.bet("1.00", "50.00", id=1)
        one_str = await a.bet("1.00", "50.00", id="1")
        assert one_int["bet_id"] != one_str["bet_id"]
        conflict = await a.bet("2.00", "50.00", id="abc")
        assert conflict["code"] == "IDEMPOTENCY_CONFLICT" and conflict["id"] == "abc"


async def put_bet_record(settings: Settings, user_id: int, bet_id: str, blob: bytes) -> None:
    """Store an idempotency record for a 1.00 USDT bet under 50.00 with balance-after 7.77,
    as bet-n.lua lays it out, with ``blob`` as its answer."""
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        key = Keys(settings.key_prefix, settings.buckets).bet_idem(user_id, bet_id)
        await client.set(key, b"USDT|100|5000|under\n777\n" + blob, px=60_000)
    finally:
        await client.aclose()


async def test_a_record_of_an_older_server_replays(api: Api, settings: Settings) -> None:
    """Records hold the bet's outbox event now; one an older server wrote (its own 8-field
    result list) is still answered from, within its window after an upgrade."""
    uid, token = await api.player(deposit="10.00")
    sh = "ab" * 32
    await put_bet_record(settings, uid, "old", msgpack.packb(
        ["9-42", 1234, True, 19800, 198, 42, sh, "cs-old"]))
    async with api.play(token) as p:
        r = await p.bet("1.00", "50.00", id="old")
        new = await p.bet("1.00", "50.00", id="new")
        again = await p.bet("1.00", "50.00", id="new")
    assert r == {
        "type": "bet_result", "id": "old", "bet_id": "9-42", "roll": "12.34", "win": True,
        "multiplier": "1.9800", "payout": "1.98", "balance": "7.77", "nonce": 42,
        "server_seed_hash": sh, "client_seed": "cs-old",
    }
    assert new["nonce"] == 1 and again == new  # the old record used no nonce here
    assert (await api.user(uid))["balances"]["USDT"] == new["balance"]


async def test_an_unreadable_record_fails_only_its_own_bet(api: Api, settings: Settings) -> None:
    """A record this version cannot read (another version's format) answers that bet id
    with UNAVAILABLE; the other bets of the same call still settle, nothing moves for it."""
    uid, token = await api.player(deposit="10.00")
    await put_bet_record(settings, uid, "odd", msgpack.packb([1, 2, 3]))
    async with api.play(token) as p:
        # Sent back to back: one call to Redis carries all three.
        for i in ("a", "odd", "b"):
            await p.send({"type": "bet", "id": i, "currency": "USDT", "amount": "1.00",
                          "target": "50.00", "direction": "under"})
        by_id = {r["id"]: r for r in [await p.recv() for _ in range(3)]}
        after = await p.bet("1.00", "50.00", id="c")
    first, odd, second = by_id["a"], by_id["odd"], by_id["b"]
    assert odd["type"] == "error" and odd["code"] == "UNAVAILABLE" and odd["id"] == "odd"
    assert first["nonce"] == 1 and second["nonce"] == 2 and after["nonce"] == 3
    assert (await api.user(uid))["balances"]["USDT"] == after["balance"]


async def test_pushes_reach_other_sockets_but_not_the_betting_one(api: Api) -> None:
    uid, token = await api.player(deposit="10.00")
    async with api.play(token) as a, api.play(token) as b:
        result = await a.bet("1.00", "50.00")
        push = await asyncio.wait_for(b.recv_any(), 5)
        assert push == {"type": "balance", "currency": "USDT", "balance": result["balance"],
                        "reason": "bet"}
        await api.deposit(uid, "5.00")
        for p in (a, b):
            push = await asyncio.wait_for(p.recv_any(), 5)
            assert push["type"] == "balance" and push["reason"] == "deposit"
        # a saw no push for its own bet: its first push was the deposit
        assert a.pushes == []


async def test_ping(api: Api) -> None:
    _, token = await api.player()
    async with api.play(token) as p:
        assert await p.request({"type": "ping", "id": "x"}) == {"type": "pong", "id": "x"}


async def test_seed_secrecy_and_reveal_reproduces_every_bet(api: Api) -> None:
    _, token = await api.player(deposit="100.00")
    frames: list[Any] = []
    async with api.play(token) as p:
        frames.append(p.welcome)
        committed = p.welcome["seed"]["server_seed_hash"]
        bets = []
        for i in range(20):
            r = await p.bet("1.00", "50.00", id=f"s{i}")
            frames.append(r)
            bets.append(r)
        rotated = await p.request({"type": "rotate_seed", "id": "rot", "client_seed": "mine-1"})
    assert rotated["type"] == "seed_rotated"
    revealed = rotated["revealed"]
    server_seed = revealed["server_seed"]
    before = json.dumps(frames + p.pushes)
    assert server_seed not in before
    assert seeds.server_seed_hash(server_seed) == committed == revealed["server_seed_hash"]
    assert revealed["nonce"] == 20
    assert rotated["current"]["nonce"] == 0 and rotated["current"]["client_seed"] == "mine-1"
    assert rotated["current"]["server_seed_hash"] != committed
    for r in bets:
        roll = dice.roll(server_seed, revealed["client_seed"], r["nonce"])
        assert dice.format_hundredths(roll) == r["roll"]
    assert sorted(r["nonce"] for r in bets) == list(range(1, 21))


async def test_new_pair_starts_at_nonce_one(api: Api) -> None:
    _, token = await api.player(deposit="10.00")
    async with api.play(token) as p:
        await p.bet("1.00")
        await p.request({"type": "rotate_seed", "id": 1, "client_seed": "abc.DEF_12-3"})
        r = await p.bet("1.00")
        assert r["nonce"] == 1 and r["client_seed"] == "abc.DEF_12-3"


async def test_bad_token_is_unauthorized_then_closed(api: Api) -> None:
    await assert_refused_then_closed(api.address, {"type": "auth", "token": "nope"})


async def test_first_frame_of_another_type_is_unauthorized(api: Api) -> None:
    await assert_refused_then_closed(api.address, {"type": "ping", "id": 3})
