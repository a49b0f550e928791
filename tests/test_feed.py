"""The spectator socket, ``/ws/feed``: content, encodings, batching, slow and chatty clients."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import httpx
import msgpack
import pytest
import pytest_asyncio
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from plumbing.settings import Settings
from server.feed import FEED_FIELDS, Feed
from server.metrics import Metrics
from server.wslink import framed
from tests.conftest import serve
from tests.helpers import Api, Player, RawSocket, eventually, json_or_msgpack


def feed_url(address: str, fmt: str | None = None) -> str:
    return f"ws://{address}/ws/feed" + (f"?format={fmt}" if fmt else "")


async def collect(
    ws: ClientConnection, bet_ids: list[str], within_s: float = 10.0
) -> tuple[list[float], list[str | bytes], list[dict[str, Any]]]:
    """Frames until every bet of ``bet_ids`` was seen: (arrival times, raw frames, our bets)."""
    wanted = set(bet_ids)
    times: list[float] = []
    frames: list[str | bytes] = []
    ours: list[dict[str, Any]] = []
    seen = 0
    deadline = time.monotonic() + within_s
    while seen < len(wanted):
        frame = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        times.append(time.monotonic())
        frames.append(frame)
        message = json_or_msgpack(frame)
        assert message["type"] == "feed" and isinstance(message["bets"], list)
        for bet in message["bets"]:
            if bet["bet_id"] in wanted:
                ours.append(bet)
                seen += 1
    return times, frames, ours


async def collect_until(
    ws: ClientConnection, ids: asyncio.Future[list[str]]
) -> tuple[list[float], list[str | bytes], list[dict[str, Any]]]:
    """:func:`collect` of the bet ids that ``ids`` resolves to, reading from the start."""
    times: list[float] = []
    frames: list[str | bytes] = []
    bets: list[dict[str, Any]] = []
    while True:
        if ids.done() and set(ids.result()) <= {b["bet_id"] for b in bets}:
            wanted = set(ids.result())
            return times, frames, [b for b in bets if b["bet_id"] in wanted]
        frame = await asyncio.wait_for(ws.recv(), 10)
        times.append(time.monotonic())
        frames.append(frame)
        message = json_or_msgpack(frame)
        assert message["type"] == "feed"
        bets += message["bets"]


async def pipelined_bets(p: Player, n: int) -> list[str]:
    """``n`` bets sent back to back; their bet ids in the order the server settled them."""
    for _ in range(n):
        await p.send({"type": "bet", "id": uuid.uuid4().hex, "currency": "USDT",
                      "amount": "0.01", "target": "50.00", "direction": "under"})
    ids = []
    for _ in range(n):
        reply = await p.recv()
        assert reply["type"] == "bet_result", reply
        ids.append(reply["bet_id"])
    return ids


async def test_a_bet_reaches_json_and_msgpack_spectators(api: Api) -> None:
    name = f"Fan{uuid.uuid4().hex[:8]}"
    uid, token = await api.player(deposit="10.00", name=name)
    async with (
        connect(feed_url(api.address), compression=None) as as_json,
        connect(feed_url(api.address, "msgpack"), compression=None) as as_msgpack,
    ):
        await api.feed_is_live(as_json, as_msgpack)
        before = int(time.time() * 1000)
        async with api.play(token) as p:
            reply = await p.bet("1.50", "37.21", "over")
        after = int(time.time() * 1000)
        assert reply["type"] == "bet_result"
        expected = {
            "bet_id": reply["bet_id"], "player": name, "currency": "USDT", "amount": "1.50",
            "target": "37.21", "direction": "over", "roll": reply["roll"],
            "win": reply["win"], "multiplier": reply["multiplier"], "payout": reply["payout"],
        }
        for ws, frame_type in ((as_json, str), (as_msgpack, bytes)):
            _, frames, ours = await collect(ws, [reply["bet_id"]])
            assert all(isinstance(f, frame_type) for f in frames)
            [bet] = ours
            assert set(bet) == {*expected, "ts"}
            assert {k: bet[k] for k in expected} == expected
            assert isinstance(bet["ts"], int) and before <= bet["ts"] <= after
            raw = frames[-1]
            text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
            assert token not in text and "user_id" not in text and "token" not in text
            assert [v for v in bet.values() if type(v) is not bool and v in (uid, str(uid))] == []


async def test_batches_at_most_ten_a_second_every_bet_once_in_order(api: Api) -> None:
    _, token = await api.player(deposit="100.00")
    async with connect(feed_url(api.address), compression=None, max_size=2**22) as ws:
        await api.feed_is_live(ws)
        ids: list[str] = []
        # Read while betting, so that arrival times are the server's sending times.
        done = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(collect_until(ws, done))
        async with api.play(token) as p:
            started = time.monotonic()
            while time.monotonic() - started < 1.5:
                reply = await p.bet("0.01", "50.00", "under")
                assert reply["type"] == "bet_result", reply
                ids.append(reply["bet_id"])
        assert len(ids) > 50  # settled quickly: many bets per batch
        done.set_result(ids)
        times, frames, ours = await reader
    assert [b["bet_id"] for b in ours] == ids  # every bet exactly once, in settlement order
    busiest = max(sum(1 for u in times if t <= u <= t + 1.0) for t in times)
    assert busiest <= 11, f"{busiest} frames in one second"
    assert len(frames) < len(ids) / 5  # batched, not one frame per bet


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def instance_b(settings: Settings) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """A second server instance on the same Redis and key prefix, with tiny feed queues."""
    own = settings.model_copy(update={"feed_queue_batches": 2, "inprocess_persister": False})
    async with serve(own) as served:
        yield served.address, served.server


def _narrow_link(server: uvicorn.Server, client: socket.socket) -> None:
    """Make the server side of ``client``'s connection a slow link: on loopback the kernel
    would otherwise grow its send buffer to megabytes before the server sees any back-pressure.
    """
    port = client.getsockname()[1]
    [conn] = [c for c in server.server_state.connections if getattr(c, "client", None)
              == ("127.0.0.1", port)]
    transport = cast(Any, conn).transport
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    transport.set_write_buffer_limits(high=8192)


async def metric(address: str, name: str) -> float:
    async with httpx.AsyncClient(base_url=f"http://{address}") as http:
        text = (await http.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def test_a_spectator_that_does_not_read_is_dropped_not_waited_on(
    api: Api, instance_b: tuple[str, uvicorn.Server]
) -> None:
    """Player on instance A, spectators on instance B (so this also crosses instances)."""
    address_b, server_b = instance_b
    dropped_name = 'stakepro_feed_dropped_spectators_total{reason="too_slow"}'
    dropped_before = await metric(address_b, dropped_name)
    # A tiny receive buffer, and never read by itself.
    slow = await asyncio.to_thread(RawSocket, address_b, "/ws/feed", 2048)
    _narrow_link(server_b, slow.s)
    try:
        async with connect(feed_url(address_b), compression=None, max_size=2**22) as fast:
            await api.feed_is_live(fast)
            _, token = await api.player(deposit="100.00")
            ids: list[str] = []
            async with api.play(token) as p:
                deadline = time.monotonic() + 20
                while await metric(address_b, dropped_name) == dropped_before:
                    assert time.monotonic() < deadline, "the slow spectator was never dropped"
                    ids += await pipelined_bets(p, 50)
                ids += await pipelined_bets(p, 100)  # after the drop: the fast one goes on
            _, _, ours = await collect(fast, ids, within_s=15)
            assert [b["bet_id"] for b in ours] == ids
            assert await metric(address_b, dropped_name) == dropped_before + 1
            # Reading now drains what was buffered for it, then the close frame.
            assert await asyncio.to_thread(slow.close_code) == 1008
    finally:
        slow.close()


async def test_client_frames_are_ignored(api: Api) -> None:
    _, token = await api.player(deposit="10.00")
    async with connect(feed_url(api.address), compression=None) as ws:
        await ws.send("hello")
        await ws.send(json.dumps({"type": "bet", "id": 1, "amount": "1.00"}))
        await ws.send(b"\x93\x01\x02")
        await api.feed_is_live(ws)
        async with api.play(token) as p:
            reply = await p.bet("0.10")
        _, _, ours = await collect(ws, [reply["bet_id"]])
        assert ours[0]["bet_id"] == reply["bet_id"]


async def test_a_flood_of_client_frames_is_closed(api: Api) -> None:
    async with connect(feed_url(api.address), compression=None) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(200):
                await ws.send("chatter")
            while True:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_unknown_format_is_refused(api: Api) -> None:
    async with connect(feed_url(api.address, "xml"), compression=None) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


# -- the Feed class alone: fan-out without stalls ---------------------------------------


class FakeHub:
    def __init__(self) -> None:
        self.channels: list[str] = []

    async def subscribe(self, channel: str, handler: Any) -> None:
        self.channels.append(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.channels.remove(channel)


class RecordingSink:
    """A spectator that keeps what it is offered; "slow" ones accept ``room`` frames."""

    def __init__(self, encoding: Any, room: int) -> None:
        self.encoding = encoding
        self.room = room
        self.frames: list[tuple[str | bytes, bytes]] = []

    def offer(self, payload: str | bytes, wire: bytes) -> bool:
        self.frames.append((payload, wire))
        return len(self.frames) <= self.room


async def test_feed_drops_a_full_sink_and_keeps_feeding_the_others() -> None:
    metrics, hub = Metrics(), FakeHub()
    feed = Feed(cast(Any, None), cast(Any, hub), "feed", metrics, 0.1)
    fast = RecordingSink("json", 100)
    packed = RecordingSink("msgpack", 100)
    slow = RecordingSink("json", 2)
    for sink in (fast, packed, slow):
        await feed.join(sink)
    assert hub.channels == ["feed"]  # subscribed once, while someone watches
    for n in range(5):
        feed.received(msgpack.packb([{"bet_id": f"b{n}", "ts": 1000 + n}]))
        feed.broadcast()
    assert [json.loads(p)["bets"][0]["bet_id"] for p, _ in fast.frames] == [
        f"b{n}" for n in range(5)]
    payload, wire = fast.frames[0]
    assert isinstance(payload, str) and wire == framed(payload)  # framed once, for all
    assert len(packed.frames) == 5 and isinstance(packed.frames[0][0], bytes)
    assert len(slow.frames) == 3  # the third offer failed: dropped, offered nothing more
    assert feed.spectators == 2
    assert metrics.feed_dropped_spectators.labels("too_slow")._value.get() == 1
    # One frame per encoding per batch: the same object went to every JSON sink.
    other = RecordingSink("json", 10)
    await feed.join(other)
    feed.received(msgpack.packb([{"bet_id": "b5", "ts": 2000}, {"bet_id": "b4", "ts": 1999}]))
    feed.broadcast()
    assert fast.frames[-1][1] is other.frames[-1][1]
    assert [b["bet_id"] for b in json.loads(other.frames[-1][0])["bets"]] == ["b4", "b5"]
    for sink in (fast, packed, other):
        await feed.leave(sink)
    assert hub.channels == []


async def test_a_batch_is_broadcast_on_arrival_at_most_once_per_interval() -> None:
    metrics, hub = Metrics(), FakeHub()
    feed = Feed(cast(Any, None), cast(Any, hub), "feed", metrics, 0.2)
    sink = RecordingSink("json", 100)
    await feed.join(sink)
    def frames(n: int) -> Callable[[], Awaitable[bool]]:
        async def probe() -> bool:
            return len(sink.frames) == n

        return probe

    # An instance from before FEED_FIELDS sends maps: still accepted.
    feed.received(msgpack.packb([{"bet_id": "a", "ts": 1}]))
    await eventually(frames(1), within=0.15, every=0.005)  # at once: no tick to wait for
    feed.received(msgpack.packb([{"bet_id": "b", "ts": 2}]))
    feed.received(msgpack.packb([{"bet_id": "c", "ts": 3}]))
    await asyncio.sleep(0.05)
    assert len(sink.frames) == 1  # less than one interval after the last frame: held
    await eventually(frames(2))
    assert [b["bet_id"] for b in json.loads(sink.frames[1][0])["bets"]] == ["b", "c"]
    await feed.close()


async def test_feed_outbox_is_bounded() -> None:
    metrics = Metrics()
    feed = Feed(cast(Any, None), cast(Any, FakeHub()), "feed", metrics, 0.1)
    for n in range(5010):
        feed.add((str(n), *[None] * (len(FEED_FIELDS) - 2), n))
    assert len(feed._outbox) == 5000 and feed._outbox[0][0] == "10"
    assert metrics.feed_dropped_bets.labels("outbox_full")._value.get() == 10


async def test_feed_channel_entries_are_lists() -> None:
    """Instances send each other lists in FEED_FIELDS order; spectators get the protocol's
    maps, sorted by ts; a list of the wrong length or a non-integer ts is dropped."""
    feed = Feed(cast(Any, None), cast(Any, FakeHub()), "feed", Metrics(), 0.1)
    sink = RecordingSink("json", 100)
    await feed.join(sink)
    late = ["b2", "bob", "BTC", "0.00000100", "99.00", "under", "12.34", True, "1.0000",
            "0.00000101", 20]
    early = ["b1", "ann", "USDT", "1.00", "50.00", "over", "75.10", True, "1.9800", "1.98", 10]
    feed.received(msgpack.packb([late, early, early[:-1], [*early[:-1], "10"]]))

    async def broadcast() -> bool:
        return bool(sink.frames)

    await eventually(broadcast)
    bets = json.loads(sink.frames[0][0])["bets"]
    assert bets == [dict(zip(FEED_FIELDS, early, strict=True)),
                    dict(zip(FEED_FIELDS, late, strict=True))]
    await feed.close()
