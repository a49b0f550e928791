"""The debug echo endpoint: off by default, and shaped like the player socket when on."""

from __future__ import annotations

import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from plumbing.settings import Settings
from tests.conftest import serve
from tests.helpers import Api


async def test_echo_is_not_served_by_default(api: Api) -> None:
    with pytest.raises(InvalidStatus):
        async with connect(f"ws://{api.address}/debug/echo/ws/play"):
            pass


async def test_echo_answers_like_the_player_socket(settings: Settings) -> None:
    async with serve(settings.model_copy(update={"debug_echo": True})) as served:
        async with connect(f"ws://{served.address}/debug/echo/ws/play") as ws:
            await ws.send(json.dumps({"type": "auth", "token": "x"}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            for n in (1, 2):
                await ws.send(json.dumps({"type": "bet", "id": f"b{n}", "currency": "USDT",
                                          "amount": "1.00", "target": "50", "direction": "under"}))
                reply = json.loads(await ws.recv())
                assert reply["type"] == "bet_result" and reply["id"] == f"b{n}"
                assert reply["nonce"] == n


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_reference_echo_process(api: Api, encoding: str) -> None:
    """bench/echo_server.py, the issue's stock-uvicorn echo, as its own process: the load
    tester's bets run against it (players made on the real server through --http)."""
    import asyncio
    import signal
    import sys

    from loadtest.bets import run_bets
    from loadtest.options import BetsOptions
    from tests.conftest import ADMIN_TOKEN, free_port

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.echo_server", "--port", str(port))
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            break
        report = await run_bets(BetsOptions(
            url=f"ws://127.0.0.1:{port}", http=f"http://{api.address}", admin_token=ADMIN_TOKEN,
            connections=3, inflight=2, duration=1.0, ramp_up=0.0, encoding=encoding,
            server_pid=proc.pid,
        ))
        assert report.bets > 0 and report.errors == {}, report.errors
        assert report.ok
    finally:
        proc.terminate()
        # uvicorn stops gracefully, then re-raises the signal it caught
        assert await asyncio.wait_for(proc.wait(), 10) in (0, -signal.SIGTERM)
