"""Crash safety with real processes killed by SIGKILL (no finally, no atexit, no flush).

(a) a Dramatiq worker dies inside a persistence batch, before its COMMIT and after it
    (before XACK); (b) the flusher dies after the PostgreSQL statement that pays the
    commissions, before Redis credits them and after; (c) the game server dies with bets in
    flight. After a restart and the drain: every bet acknowledged to a client is in ``bets``
    exactly once, none twice, every commission is paid exactly once, and
    ``python -m ops.audit`` passes. The workers and the scheduler are the real
    ``dramatiq workers.actors`` and ``workers.scheduler``; the kills come from
    workers/faults.py points (a and b) or from the test (c).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import ADMIN_TOKEN, started
from tests.helpers import Api
from tests.workerprocs import (
    Stack,
    Tree,
    bet_counts,
    earned,
    eventually,
    paid_exactly,
    play,
    redis_balances,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    s = await Stack.create(tmp_path_factory.mktemp("crash"))
    yield s
    await s.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(stack: Stack) -> AsyncIterator[Api]:
    """A game server in this process, in-process persister off (for (a) and (b))."""
    server, task, address = await started(stack.settings)
    async with Api(address, ADMIN_TOKEN) as client:
        yield client
    server.should_exit = True
    await task


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(stack.settings.database_url, min_size=1, max_size=2)
    yield p
    await p.close()


async def recovered(stack: Stack, pool: asyncpg.Pool, tree: Tree, ids: list[str],
                    stakes: list[int]) -> None:
    """Every bet once, outbox empty, every commission once, and the audit passes."""

    async def all_in() -> bool:
        return await bet_counts(pool, ids) == dict.fromkeys(ids, 1) and (
            await stack.pending() == 0)

    await eventually(all_in)
    await paid_exactly(pool, stack, tree, stakes)
    audit = stack.audit()
    assert audit.returncode == 0, audit.stdout + audit.stderr


@pytest.mark.parametrize("point", ["persist_before_commit", "persist_after_commit"])
async def test_worker_killed_during_a_batch(
    point: str, api: Api, stack: Stack, pool: asyncpg.Pool
) -> None:
    tree = await Tree.create(api, players=2)
    ids, stakes = await play(api, tree, bets=12)
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


@pytest.mark.parametrize("point", ["flush_after_commit", "flush_after_credit"])
async def test_flusher_killed_after_its_commit(
    point: str, api: Api, stack: Stack, pool: asyncpg.Pool
) -> None:
    tree = await Tree.create(api, players=2)
    ids, stakes = await play(api, tree, bets=12)
    scheduler = stack.scheduler()
    worker = stack.worker(fault=f"{point}:kill")
    try:
        assert await worker.exited() != 0, stack.logs()
        ancestors = [int(uid) for uid, _ in tree.chain]
        # PostgreSQL paid (in the statement's own transaction); Redis has credited the plan
        # or not, and nothing recorded it as credited.
        owed, paid = tree.expected(stakes), await earned(pool, ancestors)
        assert all(0 < paid[a] <= owed[a] for a in ancestors), (paid, owed)
        uncredited = await pool.fetchval(
            "SELECT count(*) FROM commission_flushes WHERE credited_at IS NULL")
        assert uncredited >= 1
        if point == "flush_after_commit":
            assert await redis_balances(stack, ancestors) == dict.fromkeys(ancestors, 0)

        worker = stack.worker()
        try:
            await recovered(stack, pool, tree, ids, stakes)
            assert await redis_balances(stack, ancestors) == tree.expected(stakes)

            async def recorded() -> bool:
                return await pool.fetchval("SELECT count(*) FROM commission_flushes"
                                           " WHERE credited_at IS NULL") == 0

            await eventually(recorded)
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

    async def run(self, address: str, stop: asyncio.Event, window: int = 4,
                  limit: int = 5000) -> None:
        """Bet until ``stop`` (or ``limit`` bets), or until the server goes away."""
        try:
            async with connect(f"ws://{address}/ws/play", compression=None) as ws:
                await ws.send(json.dumps({"type": "auth", "token": self.token}))
                assert json.loads(await ws.recv())["type"] == "welcome"
                inflight = 0
                while True:
                    while inflight < window and not stop.is_set() and len(self.sent) < limit:
                        rid = f"{self.user_id}-{len(self.sent)}"
                        message = {"type": "bet", "id": rid, "currency": "USDT",
                                   "amount": "0.25", "target": "50.00",
                                   "direction": "under" if len(self.sent) % 2 else "over"}
                        self.sent[rid] = message
                        await ws.send(json.dumps(message))
                        inflight += 1
                    if inflight == 0:
                        return
                    reply = json.loads(await ws.recv())
                    if reply.get("type") == "balance":
                        continue
                    assert reply["type"] == "bet_result", reply
                    self.acked[reply["id"]] = reply["bet_id"]
                    inflight -= 1
        except (ConnectionClosed, OSError):
            return

    async def resend(self, address: str) -> None:
        """Reconnect and send every unacknowledged bet again, same id and fields: the
        server answers the original result if it had settled, else settles it now."""
        async with connect(f"ws://{address}/ws/play", compression=None) as ws:
            await ws.send(json.dumps({"type": "auth", "token": self.token}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            for rid, message in self.sent.items():
                if rid in self.acked:
                    continue
                await ws.send(json.dumps(message))
                while True:
                    reply = json.loads(await ws.recv())
                    if reply.get("type") != "balance":
                        break
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
    stack: Stack, pool: asyncpg.Pool
) -> None:
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
            return all(len(b.acked) >= 20 for b in bettors)

        await eventually(busy, 20.0, every=0.01)
        await asyncio.sleep(0.3)
        server.kill()  # SIGKILL, mid-traffic
        killed_at = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*runs), 10)
        stop.set()
        assert time.monotonic() - killed_at < 10
        unacked = sum(len(b.sent) - len(b.acked) for b in bettors)

        # The workers drain what the dead server settled: every acknowledged bet exactly
        # once; an unacknowledged one is absent or there once (bet_id is the key).
        acked_ids = [bet_id for b in bettors for bet_id in b.acked.values()]
        assert len(set(acked_ids)) == len(acked_ids)

        async def drained() -> bool:
            return await stack.pending() == 0 and await bet_counts(pool, acked_ids) == (
                dict.fromkeys(acked_ids, 1))

        await eventually(drained, 30.0)
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
        print(f"server killed with {unacked} bets unacknowledged of "
              f"{sum(len(b.sent) for b in bettors)}")
    finally:
        for proc in reversed(procs):
            assert proc.stop() == 0, stack.logs()
        server.stop()
