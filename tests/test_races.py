"""Real concurrency against the real Lua: the seed's double spend, and nonce allocation."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from tests.helpers import Api, Player, minor

_round_ids = itertools.count()


async def _fire(p: Player, bet_ids: list[str]) -> list[dict[str, Any]]:
    for bet_id in bet_ids:
        await p.send({"type": "bet", "id": bet_id, "currency": "USDT", "amount": "10.00",
                      "target": "0.01", "direction": "under"})
    return [await p.recv() for _ in bet_ids]


async def test_double_spend_twenty_bets_of_the_whole_balance_settle_once(api: Api) -> None:
    """Scenario 1, 50 rounds: 20 simultaneous 10.00 bets over 5 sockets on 10.00.

    The bets win only on a roll of 0.00 (1 in 10,001), so the one that settles leaves 0.00;
    a round whose settled bet happens to win is replaced by a fresh one (it could fund more).
    """
    rounds = 0
    while rounds < 50:
        uid, token = await api.player(deposit="10.00")
        async with api.sockets(token, 5) as players:
            n = next(_round_ids)
            ids = [[f"r{n}-{s}-{i}" for i in range(4)] for s in range(5)]
            replies = [r for rs in await asyncio.gather(
                *(_fire(p, i) for p, i in zip(players, ids, strict=True))) for r in rs]
        settled = [r for r in replies if r["type"] == "bet_result"]
        if settled and settled[0]["win"]:
            continue
        refused = [r for r in replies if r.get("code") == "INSUFFICIENT_FUNDS"]
        assert len(settled) == 1, replies
        assert len(refused) == 19, replies
        assert settled[0]["balance"] == "0.00"
        assert (await api.user(uid))["balances"]["USDT"] == "0.00"
        rounds += 1


async def test_thousand_concurrent_bets_get_distinct_contiguous_nonces(api: Api) -> None:
    uid, token = await api.player(deposit="1000.00")

    async def run(p: Player, k: int) -> list[dict[str, Any]]:
        ids = [f"n{k}-{i}" for i in range(250)]
        for bet_id in ids:
            await p.send({"type": "bet", "id": bet_id, "currency": "USDT",
                          "amount": "0.01", "target": "50.00", "direction": "over"})
        return [await p.recv() for _ in ids]

    async with api.sockets(token, 4) as players:
        replies = [r for rs in await asyncio.gather(
            *(run(p, k) for k, p in enumerate(players))) for r in rs]
    assert all(r["type"] == "bet_result" for r in replies), [
        r for r in replies if r["type"] != "bet_result"][:3]
    assert sorted(r["nonce"] for r in replies) == list(range(1, 1001))
    assert len({r["bet_id"] for r in replies}) == 1000
    # the last balance reported equals the real one, and money adds up
    stake = 1000 * 1
    paid = sum(minor(r["payout"]) for r in replies)
    final = (await api.user(uid))["balances"]["USDT"]
    assert minor(final) == 100000 - stake + paid
