"""Players for a load run, made through the admin API (``POST /api/admin/users`` and
``POST /api/admin/deposits``)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Player:
    user_id: int | str
    token: str


class SetupError(RuntimeError):
    """The server refused or failed to set up the run's players."""


async def create_players(
    http_url: str, admin_token: str, count: int, currency: str, deposit: str,
    concurrency: int = 16, request_timeout: float = 30.0,
) -> list[Player]:
    """``count`` new players, each credited ``deposit`` of ``currency``."""
    limit = asyncio.Semaphore(concurrency)
    run = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(
        base_url=http_url, headers={"Authorization": f"Bearer {admin_token}"},
        timeout=request_timeout,
        limits=httpx.Limits(max_connections=concurrency),
    ) as http:

        async def one(index: int) -> Player:
            async with limit:
                r = await http.post(
                    "/api/admin/users",
                    json={"role": "player", "name": f"load-{run}-{index}"},
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
