"""Clients for the tests: the HTTP API (httpx), the player socket (websockets), a raw
WebSocket on a plain socket, and the conditions tests wait on."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import asyncpg
import httpx
import msgpack
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from plumbing.keys import Keys
from plumbing.settings import Settings
from workers import outbox

_ids = itertools.count(1)
ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], within: float = 10.0, every: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something truthy (or fail after ``within`` s)."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r} after {within}s")
        await asyncio.sleep(every)


async def outbox_drained(client: aioredis.Redis, keys: Keys, within: float = 15.0) -> None:
    """Wait until the persister has written (and acknowledged) every outbox event."""

    async def empty() -> bool:
        return await outbox.pending_count(client, keys) == 0

    await eventually(empty, within)


def tool(settings: Settings, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m <module> <args>`` (ops.audit, ops.rebuild) on these settings'
    Redis, database and key prefix."""
    env = {**os.environ, "REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url,
           "KEY_PREFIX": settings.key_prefix}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def minor(text: str, decimals: int = 2) -> int:
    """A decimal string of the wire in minor units (hundredths by default), exactly: a
    digit past ``decimals`` fails instead of being rounded away."""
    value = Decimal(text) * 10**decimals
    assert value == value.to_integral_value(), text
    return int(value)


@dataclass
class Direct:
    """A Redis client, a pool on the test database and keys of a prefix of their own that no
    server drains: for tests that call the workers' functions directly."""

    redis: aioredis.Redis
    pool: asyncpg.Pool
    keys: Keys

    @classmethod
    @asynccontextmanager
    async def on(cls, settings: Settings, tag: str, buckets: int = 4,
                 pool_size: int = 4) -> AsyncIterator[Self]:
        redis = aioredis.Redis.from_url(settings.redis_url)
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=pool_size)
        try:
            yield cls(redis, pool, Keys(f"{tag}{uuid.uuid4().hex[:6]}", buckets))
        finally:
            await pool.close()
            await redis.aclose()

    async def user(self, role: str = "player", parent: int | None = None, bps: int = 0) -> int:
        """A user row written directly (no Redis balance, no seed pair)."""
        return int(await self.pool.fetchval(
            "INSERT INTO users (role, parent_id, commission_bps, name, token_hash)"
            " VALUES ($1, $2, $3, 'u', $4) RETURNING user_id", role, parent, bps,
            os.urandom(16)))


class Api:
    def __init__(self, address: str, admin_token: str) -> None:
        self.address = address
        self.http = httpx.AsyncClient(
            base_url=f"http://{address}", headers={"Authorization": f"Bearer {admin_token}"}
        )

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.http.aclose()

    async def create_user(self, role: str = "player", **fields: Any) -> tuple[int, str]:
        r = await self.http.post("/api/admin/users", json={"role": role, **fields})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["user_id"], body["token"]

    async def deposit(self, user_id: int, amount: str, currency: str = "USDT") -> str:
        r = await self.http.post(
            "/api/admin/deposits",
            json={"user_id": user_id, "currency": currency, "amount": amount,
                  "idempotency_key": uuid.uuid4().hex},
        )
        assert r.status_code == 200, r.text
        return str(r.json()["balance"])

    async def player(self, deposit: str | None = None, currency: str = "USDT",
                     **fields: Any) -> tuple[int, str]:
        uid, token = await self.create_user("player", **fields)
        if deposit is not None:
            await self.deposit(uid, deposit, currency)
        return uid, token

    async def user(self, user_id: int) -> dict[str, Any]:
        r = await self.http.get(f"/api/admin/users/{user_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def play(self, token: str | None = None, msgpack_frames: bool = False) -> Player:
        return Player(self.address, token, msgpack_frames)

    @asynccontextmanager
    async def sockets(self, token: str, count: int) -> AsyncIterator[list[Player]]:
        """``count`` signed-in sockets of one player, all closed at the end."""
        async with AsyncExitStack() as stack:
            yield [await stack.enter_async_context(self.play(token)) for _ in range(count)]

    async def feed_is_live(self, *spectators: ClientConnection) -> None:
        """Wait until a bet settled now reaches every one of these feed sockets (their
        instances have subscribed): bet 0.01 now and then until each has seen one. The
        frames read meanwhile are gone."""
        _, token = await self.player(deposit="10.00")
        async with self.play(token) as p:
            ids: set[str] = set()

            async def sees(spectator: ClientConnection) -> None:
                while True:
                    message = json_or_msgpack(await spectator.recv())
                    if any(b["bet_id"] in ids for b in message["bets"]):
                        return

            for spectator in spectators:
                async with asyncio.timeout(10):
                    while True:
                        reply = await p.bet("0.01", "50.00")
                        assert reply["type"] == "bet_result", reply
                        ids.add(reply["bet_id"])
                        try:
                            await asyncio.wait_for(sees(spectator), 0.5)
                            break
                        except TimeoutError:
                            continue


def json_or_msgpack(frame: str | bytes) -> dict[str, Any]:
    decoded = msgpack.unpackb(frame) if isinstance(frame, bytes) else json.loads(frame)
    assert isinstance(decoded, dict), decoded
    return decoded


async def assert_refused_then_closed(address: str, first: dict[str, Any]) -> None:
    """A socket whose first frame is ``first`` (not a valid sign-in) gets UNAUTHORIZED,
    then a close with 1008."""
    async with connect(f"ws://{address}/ws/play") as ws:
        await ws.send(json.dumps(first))
        err = json.loads(await ws.recv())
        assert err["type"] == "error" and err["code"] == "UNAUTHORIZED", err
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


class Player:
    """A player socket: ``async with api.play(token) as p: await p.bet(...)``."""

    def __init__(self, address: str, token: str | None, msgpack_frames: bool = False) -> None:
        self.url = f"ws://{address}/ws/play"
        self.token = token
        self.msgpack = msgpack_frames
        self.ws: ClientConnection | None = None
        self.welcome: dict[str, Any] = {}
        self.pushes: list[dict[str, Any]] = []

    async def __aenter__(self) -> Player:
        self.ws = await connect(self.url, compression=None, max_size=2**20)
        if self.token is not None:
            await self.send({"type": "auth", "token": self.token})
            self.welcome = await self.recv()
            assert self.welcome["type"] == "welcome", self.welcome
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.ws is not None
        await self.ws.close()

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        if self.msgpack:
            await self.ws.send(msgpack.packb(message))
        else:
            await self.ws.send(json.dumps(message))

    async def send_raw(self, frame: str | bytes) -> None:
        assert self.ws is not None
        await self.ws.send(frame)

    async def recv(self) -> dict[str, Any]:
        """The next frame that is not a balance push (pushes are kept in ``self.pushes``)."""
        while True:
            message = await self.recv_any()
            if message.get("type") == "balance":
                self.pushes.append(message)
                continue
            return message

    async def recv_any(self) -> dict[str, Any]:
        assert self.ws is not None
        return json_or_msgpack(await self.ws.recv())

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send(message)
        return await self.recv()

    async def bet(self, amount: str = "1.00", target: str = "50.00", direction: str = "under",
                  currency: str = "USDT", id: int | str | None = None) -> dict[str, Any]:
        return await self.request(
            {"type": "bet", "id": id if id is not None else next(_ids), "currency": currency,
             "amount": amount, "target": target, "direction": direction}
        )

    async def settle(self, message: dict[str, Any], unasked: list[dict[str, Any]] | None = None,
                     within: float = 30.0) -> dict[str, Any]:
        """Send a request and, while the server answers it UNAVAILABLE, send it again, same
        id and fields, as docs/protocol.md tells a client to: the answer that is not
        UNAVAILABLE. Frames of no request (a ``seed_rotated`` push) go to ``unasked``."""
        deadline = time.monotonic() + within
        delay = 0.05
        while True:
            await self.send(message)
            while (reply := await self.recv()).get("id") != message["id"]:
                assert unasked is not None, reply
                unasked.append(reply)
            if reply.get("code") != "UNAVAILABLE":
                return reply
            assert time.monotonic() < deadline, f"still UNAVAILABLE after {within}s: {message}"
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)


async def bet_settled(p: Player, message: dict[str, Any]) -> dict[str, Any]:
    """A bet sent, and resent while UNAVAILABLE (:meth:`Player.settle`), that must settle;
    pushes in between are ignored."""
    reply = await p.settle(message, [])
    assert reply["type"] == "bet_result", reply
    return reply


class RawSocket:
    """A blocking WebSocket client on a plain socket (run it in a thread): the handshake,
    then bytes as the test writes them and frames as they come."""

    def __init__(self, address: str, path: str = "/ws/play",
                 receive_buffer: int | None = None) -> None:
        host, port = address.split(":")
        self.s = socket.socket()
        if receive_buffer is not None:  # before connect: it sets the TCP window
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.s.settimeout(10)
        self.s.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.s.recv(4096)
            assert chunk, "closed during the handshake"
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def close(self) -> None:
        self.s.close()

    def _need(self, n: int) -> None:
        while len(self.buffer) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk

    def read(self) -> tuple[int, bytes]:
        """The next frame: (opcode, payload); EOFError when the connection ends first."""
        self._need(2)
        opcode, n = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
        head = 2
        if n == 126:
            self._need(4)
            n, head = struct.unpack("!H", self.buffer[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, head = struct.unpack("!Q", self.buffer[2:10])[0], 10
        self._need(head + n)
        payload, self.buffer = self.buffer[head:head + n], self.buffer[head + n:]
        return opcode, payload

    def message(self) -> dict[str, Any]:
        """The next text frame, decoded; pings and pongs in between are passed over."""
        while True:
            opcode, payload = self.read()
            if opcode == 0x1:
                decoded: dict[str, Any] = json.loads(payload)
                return decoded
            assert opcode in (0x9, 0xA), (opcode, payload)

    def close_code(self) -> int | None:
        """Read every frame up to the close frame: its code (1005 if it has none), or
        None when the connection ends without one."""
        while True:
            try:
                opcode, payload = self.read()
            except EOFError:
                return None
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005


async def play_alternating(api: Api, token: str, bets: int, currency: str = "USDT",
               amount: str = "1.00") -> list[dict[str, Any]]:
    """``bets`` bets of 1.00 (or ``amount``) on one socket, alternating two targets."""
    results = []
    async with api.play(token) as p:
        for i in range(bets):
            target, direction = ("50.00", "under") if i % 2 else ("30.00", "over")
            r = await p.bet(amount=amount, target=target, direction=direction,
                            currency=currency)
            assert r["type"] == "bet_result", r
            results.append(r)
    return results


def keys_of(settings: Settings) -> Keys:
    """The key names of these settings' prefix and buckets."""
    return Keys(settings.key_prefix, settings.buckets)


def redis_pongs(port: int) -> bool:
    """Whether a Redis on this loopback port answers PING now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
