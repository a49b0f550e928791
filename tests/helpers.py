"""Clients for the tests: the HTTP API (httpx) and the player socket (websockets)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import httpx
import msgpack
from websockets.asyncio.client import ClientConnection, connect

_ids = itertools.count(1)

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


class Player:
    """A player socket: ``async with api.play(token) as p: await p.bet(...)``."""

    def __init__(self, address: str, token: str | None, msgpack_frames: bool) -> None:
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
        frame = await self.ws.recv()
        decoded = msgpack.unpackb(frame) if isinstance(frame, bytes) else json.loads(frame)
        assert isinstance(decoded, dict)
        return decoded

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send(message)
        return await self.recv()

    async def bet(self, amount: str = "1.00", target: str = "50.00", direction: str = "under",
                  currency: str = "USDT", id: int | str | None = None) -> dict[str, Any]:
        return await self.request(
            {"type": "bet", "id": id if id is not None else next(_ids), "currency": currency,
             "amount": amount, "target": target, "direction": direction}
        )
