"""Redis and PostgreSQL fail under load, beneath the whole stack as ``make run`` starts it.

Players bet on sockets of their own (a few bets in flight each, resending a bet answered
UNAVAILABLE with the same id) against ``python -m stakepro`` on a Redis and a database of
the test's own:

- Redis is SIGKILLed and started again on the same port and directory (AOF, everysec): bets
  answer UNAVAILABLE (or lose their socket) for a few seconds, then settle again; every
  acknowledged bet reaches PostgreSQL exactly once, every commission is paid once and
  ``python -m ops.audit`` passes. The existing tests/test_redis_restart.py holds the
  stricter per-bet checks against a server in the test's process.
- PostgreSQL (a cluster of the test's own, initdb on a free port: the shared server is
  never stopped) is stopped for 20 s: bets go on being settled on the open sockets, none
  refused; ``/healthz`` answers 503 naming PostgreSQL; the outbox grows in Redis; once
  PostgreSQL is back every bet reaches it, and the audit passes.

Each prints its recovery figures (``FIGURE`` lines, ``pytest -s``); docs/durability.md
records them with this command.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from plumbing.settings import Settings
from server.db import migrate
from tests.conftest import ADMIN_TOKEN, RedisServer, free_port
from tests.helpers import Api
from tests.supervised import (
    Bettor,
    PostgresCluster,
    Supervised,
    audit,
    healthz,
    postgres_bin,
)
from tests.workerprocs import Stack, Tree, bet_counts, eventually, paid_exactly

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PLAYERS = 4
#: How long PostgreSQL stays down (the issue's scenario).
PG_DOWN_S = 20.0
#: How long Redis stays down (a restart by hand, an AOF being loaded).
REDIS_DOWN_S = 3.0


async def own_stack(tmp: Path, redis_server: RedisServer, database_url: str) -> Stack:
    """A :class:`Stack` on this Redis and database (migrated here)."""
    await migrate(database_url)
    settings = Settings(
        redis_url=redis_server.url, database_url=database_url, admin_token=ADMIN_TOKEN,
        key_prefix=f"f{uuid.uuid4().hex[:6]}", log_level="warning", buckets=8,
        inprocess_persister=False, commission_flush_s=0.5, persist_run_s=2.0,
        persist_every_s=0.25, port=free_port(),
    )
    return Stack(tmp, redis_server, settings)


async def players(sup: Supervised, reconnect: bool) -> tuple[Tree, list[Bettor]]:
    async with Api(sup.address, ADMIN_TOKEN) as api:
        agents = await Tree.create(api, players=PLAYERS, deposit="5000.00")
    return agents, [Bettor(sup.address, uid, token, reconnect=reconnect)
                    for uid, token in agents.players]


async def settled_everywhere(stack: Stack, sup: Supervised, pool: asyncpg.Pool,
                             agents: Tree, bettors: list[Bettor]) -> None:
    """Every acknowledged bet in PostgreSQL once, the outbox empty, every commission paid
    once; then the supervisor stops cleanly and the audit passes."""
    for b in bettors:
        assert b.unexpected == [] and b.unresolved == [], (b.user_id, b.unexpected,
                                                            b.unresolved)
    ids = [bet_id for b in bettors for bet_id in b.bet_ids()]
    assert len(set(ids)) == len(ids)

    async def all_in() -> bool:
        return await bet_counts(pool, ids) == dict.fromkeys(ids, 1) and (
            await stack.pending() == 0)

    await eventually(all_in, 60.0)
    await paid_exactly(pool, stack, agents, [500] * len(ids))
    assert await sup.terminate() == 0, sup.output()
    result = audit(stack)
    assert result.returncode == 0, result.stdout + result.stderr


def supervisor_events(sup: Supervised) -> str:
    """The supervisor's own lines about deaths and restarts (not its children's output)."""
    ours = re.compile(r"^\S+ (\(pid \d+\) (exited|was killed)|restarted \(pid)")
    return "; ".join(line for line in sup.output().splitlines() if ours.match(line)) or (
        "no child died")


# -- Redis ---------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def aof_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer(appendonly=True)
    server.start()
    yield server
    server.cleanup()


async def test_redis_killed_and_restarted_under_load(
    aof_redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    dsn = database_url.rsplit("/", 1)[0] + f"/stakepro_faults_{uuid.uuid4().hex[:8]}"
    stack = await own_stack(tmp_path, aof_redis, dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        sup = Supervised.start(stack)
        await sup.up()
        agents, bettors = await players(sup, reconnect=True)
        stop = asyncio.Event()
        runs = [asyncio.create_task(b.run(stop)) for b in bettors]
        try:
            await eventually(lambda: every(bettors, lambda b: len(b.acks) >= 20), 20.0)
            killed = time.monotonic()
            await asyncio.to_thread(aof_redis.stop, True)
            # The outage is the scenario: it lasts REDIS_DOWN_S whatever happens meanwhile.
            await asyncio.sleep(max(0.0, killed + REDIS_DOWN_S - time.monotonic()))
            await asyncio.to_thread(aof_redis.start)  # same port and dir: reloads the AOF
            back = time.monotonic()
            # Bets settle again, for every player, well past the restart.
            await eventually(lambda: every(bettors, lambda b: b.acked_after(back) >= 20), 60.0)
        finally:
            stop.set()
            await asyncio.gather(*runs)
        first = [min(at for at, _ in b.acks.values() if at > back) for b in bettors]
        unavailable = sum(len(b.unavailable) for b in bettors)
        closes = sum(len(b.closes) for b in bettors)
        assert unavailable + closes > 0, "the outage went unseen: was Redis restarted?"
        refused = [at for b in bettors for at in b.unavailable]
        events = supervisor_events(sup)
        await settled_everywhere(stack, sup, pool, agents, bettors)
        print(f"\nFIGURE redis restart: down {back - killed:.2f} s (SIGKILL to PONG); "
              f"first settled bet {min(first) - back:.2f} s after Redis answered, every "
              f"player {max(first) - back:.2f} s; {unavailable} UNAVAILABLE answers, the "
              f"last {max(refused, default=killed) - back:+.2f} s from Redis answering; "
              f"{closes} sockets lost; supervisor: {events}")
    finally:
        await pool.close()
        await stack.close()


async def every(bettors: list[Bettor], check: Callable[[Bettor], bool]) -> bool:
    """``all(check(b) for b in bettors)``, as a probe for :func:`eventually`."""
    return all(check(b) for b in bettors)


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    pg = PostgresCluster(bindir)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.cleanup()


async def test_postgres_stopped_under_load(cluster: PostgresCluster, tmp_path: Path) -> None:
    redis_server = RedisServer()
    redis_server.start()
    stack = await own_stack(tmp_path, redis_server, cluster.url("stakepro"))
    pool = await asyncpg.create_pool(stack.settings.database_url, min_size=1, max_size=2)
    try:
        sup = Supervised.start(stack)
        await sup.up()
        agents, bettors = await players(sup, reconnect=False)
        stop = asyncio.Event()
        runs = [asyncio.create_task(b.run(stop)) for b in bettors]
        try:
            await eventually(lambda: every(bettors, lambda b: len(b.acks) >= 20), 20.0)
            await pool.close()  # ours would only see its connections dropped
            await asyncio.to_thread(cluster.stop, "fast")
            down = time.monotonic()

            async def names_postgres() -> bool:
                status, body = await healthz(sup.address)
                return status == 503 and body.get("postgres") == "error" and (
                    body.get("redis") == "ok" and "PostgreSQL" in body.get("message", ""))

            await eventually(names_postgres, 10.0)
            noticed = time.monotonic()
            # A token that signed in before is answered from its cached entry in Redis
            # (server/tokens.py): a player whose socket dropped gets back in without
            # PostgreSQL.
            async with connect(f"ws://{sup.address}/ws/play", compression=None) as ws:
                await ws.send(json.dumps({"type": "auth", "token": bettors[0].token}))
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert welcome.get("type") == "welcome", welcome
            # The outage is the scenario: it lasts PG_DOWN_S whatever happens meanwhile.
            await asyncio.sleep(max(0.0, down + PG_DOWN_S - time.monotonic()))
            during = [b.acked_after(down) for b in bettors]
            backlog = await stack.pending()
            await asyncio.to_thread(cluster.start)
            back = time.monotonic()
            before_back = [str(r["bet_id"]) for b in bettors
                           for at, r in b.acks.values() if at <= back]
            pool = await asyncpg.create_pool(stack.settings.database_url, min_size=1,
                                             max_size=2)

            async def caught_up() -> bool:
                counts = await bet_counts(pool, before_back)
                return counts == dict.fromkeys(before_back, 1)

            await eventually(caught_up, 60.0)
            caught = time.monotonic()
            await eventually(lambda: _healthy(sup), 30.0)
            healthy = time.monotonic()
        finally:
            stop.set()
            await asyncio.gather(*runs)
        assert all(n >= 50 for n in during), during  # betting went on
        assert backlog >= sum(during) // 2, (backlog, during)  # persistence waited
        for b in bettors:
            assert b.closes == [] and b.unavailable == [], (b.user_id, b.closes,
                                                            b.unavailable)
        events = supervisor_events(sup)
        await settled_everywhere(stack, sup, pool, agents, bettors)
        print(f"\nFIGURE postgres stopped {PG_DOWN_S:.0f} s: {sum(during)} bets settled "
              f"meanwhile, none refused; /healthz named PostgreSQL {noticed - down:.2f} s "
              f"after the stop; outbox backlog {backlog} entries; PostgreSQL back to every "
              f"bet persisted {caught - back:.2f} s, to /healthz 200 {healthy - back:.2f} s; "
              f"supervisor: {events}")
    finally:
        await pool.close()
        await stack.close()
        redis_server.cleanup()


async def _healthy(sup: Supervised) -> bool:
    status, _ = await healthz(sup.address)
    return status == 200
