"""Players for a load run, made through the admin API (``POST /api/admin/users`` and
``POST /api/admin/deposits``)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from games.errors import StakeProError
from games.money import Currency, parse_amount
from games.types import Minor


@dataclass(frozen=True)
class Player:
    user_id: int | str
    token: str


class SetupError(RuntimeError):
    """The server refused or failed to set up the run's players."""


async def create_players(
    http_url: str, admin_token: str, count: int, currency: str, deposit: str,
    concurrency: int = 16, request_timeout: float = 30.0, name_prefix: str | None = None,
) -> list[Player]:
    """``count`` new players, each credited ``deposit`` of ``currency``, named
    ``<name_prefix><index>`` (default prefix ``load-<random>-``)."""
    limit = asyncio.Semaphore(concurrency)
    run = uuid.uuid4().hex[:8]
    prefix = name_prefix if name_prefix is not None else f"load-{run}-"
    async with httpx.AsyncClient(
        base_url=http_url, headers={"Authorization": f"Bearer {admin_token}"},
        timeout=request_timeout,
        limits=httpx.Limits(max_connections=concurrency),
    ) as http:

        async def one(index: int) -> Player:
            async with limit:
                r = await http.post(
                    "/api/admin/users",
                    json={"role": "player", "name": f"{prefix}{index}"},
                )
                if r.status_code != 200:
                    raise SetupError(f"POST /api/admin/users: {r.status_code} {r.text[:200]}")
                body = r.json()
                player = Player(body["user_id"], body["token"])
                r = await http.post(
                    "/api/admin/deposits",
                    json={"user_id": player.user_id, "currency": currency, "amount": deposit,
                          "idempotency_key": f"load-{run}-{index}"},
                )
                if r.status_code != 200:
                    raise SetupError(f"POST /api/admin/deposits: {r.status_code} {r.text[:200]}")
                return player

        return list(await asyncio.gather(*(one(i) for i in range(count))))


#: Tries of one admin request on a transport error.
ATTEMPTS = 3


class Admin:
    """The admin API (and the public bet view) over one pooled ``httpx.AsyncClient`` with at
    most ``connections`` connections; ``async with Admin(...) as admin``."""

    def __init__(self, http_url: str, admin_token: str, connections: int = 32,
                 request_timeout: float = 30.0) -> None:
        self.http = httpx.AsyncClient(
            base_url=http_url, headers={"Authorization": f"Bearer {admin_token}"},
            timeout=request_timeout,
            limits=httpx.Limits(max_connections=connections,
                                max_keepalive_connections=connections),
        )
        self.limit = asyncio.Semaphore(connections)
        self.run = uuid.uuid4().hex[:8]
        self._keys = 0

    async def __aenter__(self) -> Admin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, tried up to ``ATTEMPTS`` times on a transport error: a kept-alive
        connection that idled past the server's keep-alive (uvicorn: 5 s) may be closed
        just as it is reused. Safe here: views are GETs, deposits carry an idempotency key,
        and a user created twice is only an unused extra user."""
        for attempt in range(ATTEMPTS):
            try:
                async with self.limit:
                    return await self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt == ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def create_user(self, role: str, name: str, parent_id: int | str | None = None,
                          commission_bps: int | None = None) -> Player:
        body: dict[str, object] = {"role": role, "name": name}
        if parent_id is not None:
            body["parent_id"] = parent_id
        if commission_bps is not None:
            body["commission_bps"] = commission_bps
        r = await self._request("POST", "/api/admin/users", json=body)
        if r.status_code != 200:
            raise SetupError(f"POST /api/admin/users: {r.status_code} {r.text[:200]}")
        data = r.json()
        return Player(data["user_id"], data["token"])

    async def deposit(self, user_id: int | str, currency: str, amount: str) -> str:
        self._keys += 1
        key = f"load-{self.run}-d{self._keys}"  # before any await: deposits run concurrently
        r = await self._request(
            "POST", "/api/admin/deposits",
            json={"user_id": user_id, "currency": currency, "amount": amount,
                  "idempotency_key": key},
        )
        if r.status_code != 200:
            raise SetupError(f"POST /api/admin/deposits: {r.status_code} {r.text[:200]}")
        return str(r.json()["balance"])

    async def player(self, name: str, currency: str, deposit: str | None,
                     parent_id: int | str | None = None) -> Player:
        player = await self.create_user("player", name, parent_id)
        if deposit is not None:
            await self.deposit(player.user_id, currency, deposit)
        return player

    async def user(self, user_id: int | str) -> dict[str, Any]:
        r = await self._request("GET", f"/api/admin/users/{user_id}")
        if r.status_code != 200:
            raise SetupError(f"GET /api/admin/users/{user_id}: {r.status_code} {r.text[:200]}")
        body: dict[str, Any] = r.json()
        return body

    async def currency(self, code: str) -> Currency:
        """``code``'s decimals and bet limits as the server announces them
        (``GET /api/limits``)."""
        r = await self._request("GET", "/api/limits")
        if r.status_code != 200:
            raise SetupError(f"GET /api/limits: {r.status_code} {r.text[:200]}")
        known: dict[str, dict[str, Any]] = r.json()["currencies"]
        if code not in known:
            raise SetupError(f"the server has no currency {code}; it has {', '.join(known)}")
        limits = known[code]
        # parse_amount reads only the decimals: the limits are parsed with a stand-in
        unit = Currency(code, int(limits["decimals"]), Minor(1), Minor(1), Minor(1))
        try:
            return Currency(code, unit.decimals, parse_amount(limits["min_bet"], unit),
                            parse_amount(limits["max_bet"], unit),
                            parse_amount(limits["max_profit"], unit))
        except StakeProError as exc:
            raise SetupError(f"GET /api/limits: {code}: {exc}") from None

    async def bet_status(self, bet_id: int | str) -> int:
        """Status of ``GET /api/bets/{bet_id}`` (200 once stored, 404 before)."""
        r = await self._request("GET", f"/api/bets/{bet_id}")
        return r.status_code
