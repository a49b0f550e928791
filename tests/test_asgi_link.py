"""The player and feed sockets under plain ASGI (server/wslink.py's AsgiLink).

The server normally runs uvicorn with server.wslink.DirectProtocol, which hands frames to
the session by a plain call; under any other ASGI server the same sessions run over
``receive`` and ``send``. This module serves the app with uvicorn's stock sans-I/O protocol
and checks the behaviours that differ between the two links: frames in and out, the
in-flight limit, sign-in and closing, the feed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from plumbing.settings import Settings
from tests.conftest import ADMIN_TOKEN, serve
from tests.helpers import Api, assert_refused_then_closed

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plain(settings: Settings) -> AsyncIterator[Api]:
    own = settings.model_copy(update={"inprocess_persister": False})
    async with serve(own, ws="websockets-sansio") as served, Api(served.address,
                                                                 ADMIN_TOKEN) as api:
        yield api


async def test_bets_pipelined_past_the_inflight_limit_are_all_answered(plain: Api) -> None:
    _, token = await plain.player(deposit="100.00")
    async with plain.play(token) as p:
        for i in range(150):  # more than max_inflight_per_socket (64)
            await p.send({"type": "bet", "id": i, "currency": "USDT", "amount": "0.01",
                          "target": "50.00", "direction": "under"})
        replies = [await p.recv() for _ in range(150)]
        assert sorted(r["id"] for r in replies) == list(range(150))
        assert all(r["type"] == "bet_result" for r in replies)
        assert sorted(r["nonce"] for r in replies) == list(range(1, 151))
        again = await p.bet("0.01", "50.00", id=7)  # a replay
        assert again["nonce"] == next(r["nonce"] for r in replies if r["id"] == 7)


async def test_double_spend_over_plain_asgi(plain: Api) -> None:
    uid, token = await plain.player(deposit="10.00")
    async with plain.sockets(token, 4) as players:
        for k, p in enumerate(players):
            for i in range(5):
                await p.send({"type": "bet", "id": f"{k}-{i}", "currency": "USDT",
                              "amount": "10.00", "target": "0.01", "direction": "under"})
        replies: list[dict[str, Any]] = []
        for p in players:
            replies += [await p.recv() for _ in range(5)]
    settled = [r for r in replies if r["type"] == "bet_result"]
    assert len(settled) == 1 or settled[0]["win"], replies
    if not settled[0]["win"]:
        assert (await plain.user(uid))["balances"]["USDT"] == "0.00"


async def test_bad_token_is_answered_then_closed(plain: Api) -> None:
    await assert_refused_then_closed(plain.address, {"type": "auth", "token": "nope"})


async def test_the_feed_over_plain_asgi(plain: Api) -> None:
    _, token = await plain.player(deposit="10.00")
    async with connect(f"ws://{plain.address}/ws/feed", compression=None) as feed:
        await plain.feed_is_live(feed)
        async with plain.play(token) as p:
            reply = await p.bet("0.10")
        seen: list[str] = []
        async with asyncio.timeout(10):
            while reply["bet_id"] not in seen:
                seen += [b["bet_id"] for b in json.loads(await feed.recv())["bets"]]
    async with connect(f"ws://{plain.address}/ws/feed?format=xml") as bad:
        with pytest.raises(ConnectionClosed) as closed:
            await bad.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
