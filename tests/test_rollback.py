"""Redis rolls back under a running stack (issue 12): nothing doubled, nothing lost, no human.

A Redis of its own with ``appendfsync always``, the real Dramatiq worker and scheduler
processes, and a game server. Players bet (phase A); at the rollback point the test copies
Redis's data directory; players bet more, deposit and rotate (phase C, "in doubt"), all of
it persisted and paid; then Redis is SIGKILLed and started again from the copy: it has
forgotten phase C (and whatever came after the point). With everything left running, the
players resend every in-doubt bet with its same id and bet once more. Then:

- every resend is answered with its original result (same bet id, roll, nonce, balance),
  none is settled again: PostgreSQL holds each (player, client id) once;
- every balance in Redis (players and their agent chain) equals the ledger, healed without
  a human step, and the deposit made in doubt is credited exactly once, even when the admin
  retries it with its key;
- no (server seed, nonce) was used twice, and ``python -m ops.audit`` passes.

The rollback point is one of:

- ``before_flush``: everything of phase A persisted and paid; nothing pending;
- ``flush_commit_before_credit``: a worker died right after a commission flush committed in
  PostgreSQL and before it credited Redis (fault point ``flush_after_commit``);
- ``persist_commit_before_ack``: a worker died right after an outbox batch committed and
  before its acknowledgement (``persist_after_commit``): Redis still holds those entries.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from tests.conftest import ADMIN_TOKEN, started
from tests.helpers import Api, bet_settled
from tests.workerprocs import DIFF, Proc, Stack, Tree, eventually, ledger_equals_redis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

POINTS = ["before_flush", "flush_commit_before_credit", "persist_commit_before_ack"]
BETS = [("1.00", "49.50", "over"), ("0.37", "30.00", "under"), ("2.10", "75.00", "under")]


@pytest_asyncio.fixture(loop_scope="session")
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = await Stack.create(tmp_path, appendonly=True)
    yield s
    await s.close()


async def play(api: Api, tree: Tree, tag: str, n: int,
               told: dict[str, dict[str, Any]]) -> None:
    """``n`` bets per player with ids ``<tag>-<player>-<i>``; every result goes to ``told``."""

    async def one(uid: int, token: str) -> None:
        async with api.play(token) as p:
            for i in range(n):
                amount, target, direction = BETS[i % len(BETS)]
                message = {"type": "bet", "id": f"{tag}-{uid}-{i}", "currency": "USDT",
                           "amount": amount, "target": target, "direction": direction}
                told[message["id"]] = {"message": message, "uid": uid,
                                       "reply": await bet_settled(p, message)}

    await asyncio.gather(*(one(uid, token) for uid, token in tree.players))


async def commission_totals(pool: asyncpg.Pool, users: list[int]) -> dict[int, int]:
    rows = await pool.fetch(
        "SELECT user_id, sum(delta)::bigint AS s FROM ledger WHERE kind = 'commission'"
        " AND user_id = ANY($1::bigint[]) GROUP BY user_id", users)
    return dict.fromkeys(users, 0) | {int(r["user_id"]): int(r["s"]) for r in rows}


def restart_from(stack: Stack, snapshot: Path) -> None:
    """SIGKILL Redis and start it again from an older copy of its data directory."""
    server = stack.redis_server
    server.stop(kill=True)
    shutil.rmtree(server.dir)
    shutil.copytree(snapshot, server.dir)
    server.start()


@pytest.mark.parametrize("point", POINTS)
async def test_redis_rollback_heals_itself(point: str, stack: Stack, tmp_path: Path) -> None:
    settings = stack.settings.model_copy(update={"redis_durability": "always"})
    server, task, address = await started(settings)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    procs: list[Proc] = [stack.scheduler(), stack.worker()]
    snapshot = tmp_path / "snapshot"
    told: dict[str, dict[str, Any]] = {}
    try:
        async with Api(address, ADMIN_TOKEN) as api:
            tree = await Tree.create(api, players=3, deposit="200.00")
            players = [uid for uid, _ in tree.players]
            ancestors = [int(uid) for uid, _ in tree.chain]
            await play(api, tree, "a", 4, told)
            await eventually(lambda: stack.commissions_idle())

            if point == "before_flush":
                shutil.copytree(stack.redis_server.dir, snapshot)
            else:
                worker = procs.pop()
                assert worker.stop() == 0, stack.logs()
                await play(api, tree, "b", 3, told)
                fault = ("flush_after_commit" if point == "flush_commit_before_credit"
                         else "persist_after_commit")
                dying = stack.worker(fault=f"{fault}:kill")
                assert await dying.exited() != 0, stack.logs()
                if point == "persist_commit_before_ack":
                    # PostgreSQL holds the batch; Redis still has its entries pending.
                    held = await pool.fetchval(
                        "SELECT count(*) FROM bets WHERE client_id LIKE 's:b-%'")
                    assert held == 3 * len(players) and await stack.pending() > 0
                else:
                    paid = await commission_totals(pool, ancestors)
                    assert paid != dict.fromkeys(ancestors, 0)
                shutil.copytree(stack.redis_server.dir, snapshot)
                procs.append(stack.worker())

            # Phase C, in doubt: bets, a deposit and a rotation, all persisted and paid.
            in_doubt_from = len(told)
            await play(api, tree, "c", 4, told)
            deposit_key = f"in-doubt-{uuid.uuid4().hex}"
            deposit = {"user_id": players[0], "currency": "USDT", "amount": "5.00",
                       "idempotency_key": deposit_key}
            r = await api.http.post("/api/admin/deposits", json=deposit)
            assert r.status_code == 200, r.text
            async with api.play(tree.players[1][1]) as p:
                rotated = await p.request({"type": "rotate_seed", "id": "rot",
                                           "client_seed": "after-the-point"})
                assert rotated["type"] == "seed_rotated", rotated
            await eventually(lambda: stack.commissions_idle())
            assert await ledger_equals_redis(stack, pool, players + ancestors)
            before = await commission_totals(pool, ancestors)

            await asyncio.to_thread(restart_from, stack, snapshot)

            # Every in-doubt bet resent with its id: its original result, not a new bet.
            for uid, token in tree.players:
                async with api.play(token) as p:
                    for cid, seen in list(told.items())[in_doubt_from:]:
                        if seen["uid"] != uid:
                            continue
                        again = await bet_settled(p, seen["message"])
                        for name in ("bet_id", "roll", "nonce", "payout", "balance",
                                     "server_seed_hash"):
                            assert again[name] == seen["reply"][name], (cid, name, again)
            # The admin retries the deposit: credited once, whoever credits it.
            r = await api.http.post("/api/admin/deposits", json=deposit)
            assert r.status_code == 200, r.text
            # And everyone bets on: new pairs, new nonces, commissions flowing again.
            await play(api, tree, "d", 2, told)
            for proc in procs:
                assert proc.alive(), stack.logs()
            await eventually(lambda: stack.commissions_idle(), within=40)
            # A user nothing happened to since the rollback (the master earns nothing on
            # small stakes) is healed when anything reads or moves its money: here, the
            # admin view. Until then its scripts refuse, so its stale hash is never used.
            for uid in players + ancestors:
                await api.user(uid)
            try:
                await eventually(
                    lambda: ledger_equals_redis(stack, pool, players + ancestors), within=40)
            except AssertionError:
                raise AssertionError(f"Redis != ledger: {DIFF}\n{stack.logs()}") from None

        # No bet settled twice, nothing told is missing, no nonce used twice.
        rows = await pool.fetch(
            "SELECT client_id, bet_id, server_seed_hash, nonce FROM bets"
            " WHERE user_id = ANY($1::bigint[])", players)
        by_client = {r["client_id"]: r["bet_id"] for r in rows}
        assert len(rows) == len(by_client) == len(told), (len(rows), len(told))
        assert {f"s:{cid}": seen["reply"]["bet_id"] for cid, seen in told.items()} == by_client
        assert len({(r["server_seed_hash"], r["nonce"]) for r in rows}) == len(rows)
        assert await pool.fetchval(
            "SELECT count(*) FROM ledger WHERE entry_id = $1", f"dep:{deposit_key}") == 1
        after = await commission_totals(pool, ancestors)
        stakes = [round(float(seen["message"]["amount"]) * 100) for seen in told.values()]
        # Paid once per (bet, ancestor), at every rollback point: PostgreSQL records which
        # bets a flush paid, so a replayed outbox entry cannot pay again.
        assert after == tree.expected(stakes)
        assert all(after[a] >= before[a] for a in ancestors)
        audit = await asyncio.to_thread(stack.audit)
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        for proc in reversed(procs):
            proc.stop()
        await pool.close()
        server.should_exit = True
        await task
