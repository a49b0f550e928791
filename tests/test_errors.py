"""Every error code of PROTOCOL.md, provoked over a real socket, with the balance unchanged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
import pytest_asyncio
from websockets.exceptions import ConnectionClosed

from plumbing.settings import Settings
from tests.conftest import ADMIN_TOKEN, RedisServer, serve
from tests.helpers import Api


def bet(without: str = "", **fields: Any) -> dict[str, Any]:
    """A valid bet of 1.00 USDT under 50, with ``fields`` changed and ``without`` left out."""
    message = {"type": "bet", "id": 1, "currency": "USDT", "amount": "1.00", "target": "50",
               "direction": "under", **fields}
    message.pop(without, None)
    return message


BAD_BETS: list[tuple[dict[str, Any], str]] = [  # (message, code); the reply echoes the id
    (bet(without="id"), "BAD_MESSAGE"),
    (bet(amount=1), "BAD_MESSAGE"),  # number where a decimal string belongs
    (bet(direction="sideways"), "BAD_MESSAGE"),
    (bet(id={"x": 1}), "BAD_MESSAGE"),
    (bet(id="x" * 65), "BAD_MESSAGE"),
    ({"type": "dance", "id": 1}, "BAD_MESSAGE"),
    (bet(currency="EUR", amount="1.001"), "UNKNOWN_CURRENCY"),
    (bet(amount="1.001", target="150"), "INVALID_AMOUNT"),
    (bet(amount="-1.00"), "INVALID_AMOUNT"),
    (bet(amount="1e3"), "INVALID_AMOUNT"),
    (bet(target="98.01"), "INVALID_TARGET"),
    (bet(target="0.00"), "INVALID_TARGET"),
    (bet(target="1.999", direction="over"), "INVALID_TARGET"),
    (bet(amount="10000.01"), "BET_LIMIT"),
    (bet(amount="100.00", target="0.01"), "BET_LIMIT"),  # profit over 100,000.00
    (bet(currency="BTC", amount="0.00000001"), "INSUFFICIENT_FUNDS"),
    (bet(amount="10.01"), "INSUFFICIENT_FUNDS"),
    ({"type": "rotate_seed", "id": 1, "client_seed": "has space"}, "INVALID_SEED"),
    ({"type": "rotate_seed", "id": 1, "client_seed": "x" * 65}, "INVALID_SEED"),
    ({"type": "rotate_seed", "id": 1, "client_seed": ""}, "INVALID_SEED"),
    ({"type": "rotate_seed", "id": 1, "client_seed": 5}, "BAD_MESSAGE"),
]


async def _state(api: Api, uid: int) -> dict[str, Any]:
    return (await api.user(uid))["balances"]


@pytest.mark.parametrize(("message", "code"), BAD_BETS)
async def test_error_codes_change_nothing(api: Api, message: dict[str, Any], code: str) -> None:
    uid, token = await api.player(deposit="10.00")
    before = await _state(api, uid)
    async with api.play(token) as p:
        reply = await p.request(message)
        assert reply["type"] == "error", reply
        assert reply["code"] == code, reply
        assert isinstance(reply["message"], str) and reply["message"]
        valid_id = message.get("id")
        too_long = isinstance(valid_id, str) and len(valid_id) > 64
        if not isinstance(valid_id, int | str) or too_long:
            valid_id = None  # an error about the id itself echoes null
        assert reply["id"] == valid_id
        assert await _state(api, uid) == before
        # the socket stays open and the refused request used no nonce
        pong = await p.request({"type": "ping", "id": "after"})
        assert pong["type"] == "pong"
        ok = await p.bet("1.00", "50.00", id="ok")
        assert ok["nonce"] == 1


@pytest.mark.parametrize("frame", ["{not json", "[1, 2]", "42", "null", "NaN",
                                   b"\xc1", msgpack.packb([1, 2]), b""])
async def test_undecodable_frames_are_bad_message_and_keep_the_socket(
    api: Api, frame: str | bytes
) -> None:
    uid, token = await api.player(deposit="5.00")
    async with api.play(token) as p:
        await p.send_raw(frame)
        reply = await p.recv()
        assert reply["code"] == "BAD_MESSAGE" and reply["id"] is None
        assert (await p.request({"type": "ping", "id": 1}))["type"] == "pong"
    assert (await _state(api, uid))["USDT"] == "5.00"


async def test_frame_over_the_limit_closes_with_1009(api: Api) -> None:
    _, token = await api.player()
    async with api.play(token) as p:
        assert p.ws is not None
        await p.ws.send(json.dumps({"type": "ping", "id": 1, "pad": "x" * (70 * 1024)}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await p.ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


@pytest_asyncio.fixture
async def fragile(
    settings: Settings, own_redis: RedisServer
) -> AsyncIterator[tuple[str, RedisServer, Settings]]:
    """A second server with its own Redis (to kill) and a tiny rate limit."""
    own = settings.model_copy(
        update={"redis_url": own_redis.url, "rate_per_socket": 5.0, "rate_burst": 5}
    )
    async with serve(own) as served:
        yield served.address, own_redis, own


async def test_rate_limited(fragile: tuple[str, RedisServer, Settings]) -> None:
    address, _, _ = fragile
    async with Api(address, ADMIN_TOKEN) as api:
        uid, token = await api.player(deposit="1.00")
        async with api.play(token) as p:
            codes = []
            for i in range(12):
                codes.append((await p.request({"type": "ping", "id": i}))["type"])
            assert "pong" in codes
            assert codes.count("error") >= 5
        assert (await api.user(uid))["balances"]["USDT"] == "1.00"


async def test_unavailable_when_redis_is_down(fragile: tuple[str, RedisServer, Settings]) -> None:
    address, redis, _ = fragile
    async with Api(address, ADMIN_TOKEN) as api:
        _, token = await api.player(deposit="1.00")
        async with api.play(token) as p:
            redis.stop(kill=True)
            try:
                await p.send({"type": "bet", "id": "u", "currency": "USDT", "amount": "1.00",
                              "target": "50", "direction": "under"})
                reply = await asyncio.wait_for(p.recv(), 30)
                assert reply["code"] == "UNAVAILABLE" and reply["id"] == "u"
            finally:
                redis.start()

