"""The debug echo endpoint: off by default, and shaped like the player socket when on."""

from __future__ import annotations

import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.settings import Settings
from tests.conftest import serve
from tests.helpers import Api


async def test_echo_is_not_served_by_default(api: Api) -> None:
    with pytest.raises(InvalidStatus):
        async with connect(f"ws://{api.address}/debug/echo/ws/play"):
            pass


async def test_echo_answers_like_the_player_socket(settings: Settings) -> None:
    server, task, address = await serve(settings.model_copy(update={"debug_echo": True}))
    try:
        async with connect(f"ws://{address}/debug/echo/ws/play") as ws:
            await ws.send(json.dumps({"type": "auth", "token": "x"}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            for n in (1, 2):
                await ws.send(json.dumps({"type": "bet", "id": f"b{n}", "currency": "USDT",
                                          "amount": "1.00", "target": "50", "direction": "under"}))
                reply = json.loads(await ws.recv())
                assert reply["type"] == "bet_result" and reply["id"] == f"b{n}"
                assert reply["nonce"] == n
    finally:
        server.should_exit = True
        await task
