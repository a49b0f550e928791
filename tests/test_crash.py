"""Crash safety with real processes killed by SIGKILL (no finally, no atexit, no flush).

(a) a Dramatiq worker dies inside a persistence batch, before its COMMIT and after it
    (before XACK); (b) the flusher dies between taking the commission aggregate and the
    PostgreSQL statement that pays it; (c) the game server dies with bets in flight. After a
    restart and the drain: every bet acknowledged to a client is in ``bets`` exactly once,
    none twice, every commission is paid exactly once, and ``python -m ops.audit``
    passes. The workers and the scheduler are the real ``dramatiq workers.actors`` and
    ``workers.scheduler``; the kills come from workers/faults.py points (a and b) or from
    the test (c).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from tests.conftest import ADMIN_TOKEN
from tests.helpers import Api, Player
from tests.workerprocs import (
    Stack,
    Tree,
    bet_counts,
    betting_tree,
    earned,
    eventually,
    persisted_once,
    recovered,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.mark.parametrize("point", ["persist_before_commit", "persist_after_commit"])
async def test_worker_killed_during_a_batch(
    point: str, stack_api: Api, stack: Stack, stack_pool: asyncpg.Pool
) -> None:
    pool = stack_pool
    tree, ids, stakes = await betting_tree(stack_api, players=2, bets=12)
    worker = stack.worker(fault=f"{point}:kill")
    stack.send("persist_outbox", 0)
    # Dramatiq's main process sees its worker process die and exits non-zero.
    assert await worker.exited() != 0, stack.logs()

    # What the kill left: before COMMIT nothing of the batch; after it, every row, but the
    # entries still unacknowledged in the stream (the shard consumer's pending list).
    counts = await bet_counts(pool, ids)
    if point == "persist_before_commit":
        assert counts == {}
    else:
        assert counts == dict.fromkeys(ids, 1)
    assert await stack.pending() >= len(ids)

    procs = [stack.worker(), stack.scheduler()]
    try:
        await recovered(stack, pool, tree, ids, stakes)
    finally:
        for proc in reversed(procs):
            assert proc.stop() == 0, stack.logs()


async def test_flusher_killed_between_take_and_commit(
    stack_api: Api, stack: Stack, stack_pool: asyncpg.Pool
) -> None:
    pool = stack_pool
    tree, ids, stakes = await betting_tree(stack_api, players=2, bets=12)
    scheduler = stack.scheduler()
    worker = stack.worker(fault="flush_after_take:kill")
    try:
        assert await worker.exited() != 0, stack.logs()
        ancestors = [int(uid) for uid, _ in tree.chain]
        # The aggregate was taken (renamed to a batch in Redis) and nothing of it was paid.
        assert await earned(pool, ancestors) == dict.fromkeys(ancestors, 0)
        client = aioredis.Redis.from_url(stack.settings.redis_url)
        try:
            unfinished = sum([int(await client.scard(stack.keys.commission_batches(b)))
                              for b in range(stack.settings.buckets)])
        finally:
            await client.aclose()
        assert unfinished >= 1

        worker = stack.worker()
        try:
            await recovered(stack, pool, tree, ids, stakes)
        finally:
            assert worker.stop() == 0, stack.logs()
    finally:
        assert scheduler.stop() == 0, stack.logs()


# -- (c) the game server -------------------------------------------------------------------


@dataclass
class Bettor:
    """One player's socket with up to ``window`` bets in flight; records what it was told."""

    token: str
    user_id: int
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    acked: dict[str, str] = field(default_factory=dict)  # request id -> bet_id
    player: Player | None = None
    inflight: int = 0

    async def send_bet(self) -> None:
        assert self.player is not None
        rid = f"{self.user_id}-{len(self.sent)}"
        message = {"type": "bet", "id": rid, "currency": "USDT", "amount": "0.25",
                   "target": "50.00", "direction": "under" if len(self.sent) % 2 else "over"}
        self.sent[rid] = message
        await self.player.send(message)
        self.inflight += 1

    async def run(self, address: str, stop: asyncio.Event, window: int = 4,
                  limit: int = 5000) -> None:
        """Bet until ``stop`` (or ``limit`` bets), or until the server goes away."""
        try:
            async with Player(address, self.token) as self.player:
                while True:
                    while (self.inflight < window and not stop.is_set()
                           and len(self.sent) < limit):
                        await self.send_bet()
                    if self.inflight == 0:
                        return
                    reply = await self.player.recv()
                    assert reply["type"] == "bet_result", reply
                    self.acked[reply["id"]] = reply["bet_id"]
                    self.inflight -= 1
        except (ConnectionClosed, OSError):
            return

    async def resend(self, address: str) -> None:
        """Reconnect and send every unacknowledged bet again, same id and fields: the
        server answers the original result if it had settled, else settles it now."""
        async with Player(address, self.token) as p:
            for rid, message in self.sent.items():
                if rid in self.acked:
                    continue
                reply = await p.settle(message)
                assert reply["type"] == "bet_result" and reply["id"] == rid, reply
                self.acked[rid] = reply["bet_id"]


async def healthy(address: str, within: float = 30.0) -> None:
    async with httpx.AsyncClient() as http:
        async def up() -> bool:
            try:
                return (await http.get(f"http://{address}/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(up, within)


async def rows_per_user(pool: asyncpg.Pool, users: list[int]) -> dict[int, int]:
    rows = await pool.fetch("SELECT user_id, count(*) AS n FROM bets"
                            " WHERE user_id = ANY($1::bigint[]) GROUP BY user_id", users)
    return {int(r["user_id"]): int(r["n"]) for r in rows}


async def test_game_server_killed_with_bets_in_flight(
    stack: Stack, stack_pool: asyncpg.Pool
) -> None:
    pool = stack_pool
    address = f"{stack.settings.host}:{stack.settings.port}"
    server = stack.server()
    procs = [stack.worker(), stack.scheduler()]
    try:
        await healthy(address)
        async with Api(address, ADMIN_TOKEN) as api:
            tree = await Tree.create(api, players=6, deposit="5000.00")
        bettors = [Bettor(token, uid) for uid, token in tree.players]
        stop = asyncio.Event()
        runs = [asyncio.create_task(b.run(address, stop)) for b in bettors]

        async def busy() -> bool:  # every socket has bets settled and more in flight
            return all(len(b.acked) >= 20 and b.inflight > 0 for b in bettors)

        await eventually(busy, 20.0, every=0.01)
        for b in bettors:  # and one sent just now, that the server cannot have answered yet
            await b.send_bet()
        in_flight = {rid for b in bettors for rid in b.sent if rid not in b.acked}
        server.kill()  # SIGKILL, mid-traffic
        await asyncio.wait_for(asyncio.gather(*runs), 10)
        stop.set()
        acked_before = {rid for b in bettors for rid in b.acked}
        # Replies already on their way were read after the kill; the rest were in flight.
        never_answered = in_flight - acked_before
        assert never_answered, f"all {len(in_flight)} bets in flight were answered"

        # The workers drain what the dead server settled: every acknowledged bet exactly
        # once; an unacknowledged one is absent or there once (bet_id is the key).
        acked_ids = [bet_id for b in bettors for bet_id in b.acked.values()]
        assert len(set(acked_ids)) == len(acked_ids)
        await persisted_once(stack, pool, acked_ids, drained=True, within=30.0)
        per_user = await rows_per_user(pool, [b.user_id for b in bettors])
        for b in bettors:
            assert len(b.acked) <= per_user[b.user_id] <= len(b.sent), (
                b.user_id, len(b.acked), per_user[b.user_id], len(b.sent))

        # Restart; clients resend what they were never told about, with the same ids.
        server = stack.server()
        await healthy(address)
        await asyncio.gather(*(b.resend(address) for b in bettors))
        all_ids = [bet_id for b in bettors for bet_id in b.acked.values()]
        assert len(set(all_ids)) == len(all_ids) == sum(len(b.sent) for b in bettors)
        stakes = [25] * len(all_ids)
        await recovered(stack, pool, tree, all_ids, stakes)
        # No bet beyond the ones the clients asked for: a resent bet that had settled
        # before the kill was answered from its record, not played again.
        assert await rows_per_user(pool, [b.user_id for b in bettors]) == {
            b.user_id: len(b.sent) for b in bettors}
        print(f"server killed with {len(never_answered)} of {len(in_flight)} bets in flight"
              f" never answered, of {sum(len(b.sent) for b in bettors)} sent")
    finally:
        for proc in reversed(procs):
            assert proc.stop() == 0, stack.logs()
        server.stop()
