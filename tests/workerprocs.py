"""A StakePro deployment of real processes for the worker and crash tests.

:class:`Stack` owns a redis-server and a PostgreSQL database of its own (so ``ops.audit``
judges only what these tests did), builds the environment every child reads its settings
from, and starts the Dramatiq workers, the scheduler and the game server as subprocesses
that a test may SIGKILL. The conftest fixtures ``stack``, ``stack_api`` and ``stack_pool``
give a test module one of them; the helpers below play bets on it and wait until they are
persisted and paid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import asyncpg
import dramatiq

from games.bets import validate_bet
from games.commission import split
from games.errors import Unavailable
from games.types import Minor, UserId
from plumbing import heal
from plumbing.keys import Keys
from plumbing.redisclient import Client, open_client, scan_keys
from plumbing.settings import Settings
from server.db import drop_database, migrate
from server.redisbatch import Batcher
from server.redisrouter import ClusterConnection
from server.wallet import BetResult, Wallet
from tests.conftest import (
    TEST_SETTINGS,
    RedisServer,
    database_named,
    free_port,
    fresh_database_name,
)
from tests.helpers import Api
from tests.helpers import eventually as helpers_eventually
from workers import outbox
from workers.broker import build, queue_name

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


async def eventually(probe: Callable[[], Awaitable[T]], within: float = 20.0,
                     every: float = 0.1) -> T:
    """tests.helpers.eventually, with the longer patience worker processes need."""
    return await helpers_eventually(probe, within, every)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not stop on SIGTERM:\n{self.tail()}") from None
        finally:
            self._kill_group()

    def kill(self) -> None:
        """SIGKILL the process and every process it started (its own process group): a
        Dramatiq worker's child outlives its killed parent, and would go on draining."""
        self._kill_group()
        self.popen.wait(10)

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    async def exited(self, within: float = 30.0) -> int:
        async def done() -> bool:
            return not self.alive()

        await eventually(done, within)
        return int(self.popen.returncode)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    tmp: Path
    redis_server: RedisServer
    settings: Settings
    procs: list[Proc] = field(default_factory=list)
    #: On a Redis Cluster (:meth:`on_cluster`): ``redis_server`` is then only the broker.
    cluster: bool = False

    @classmethod
    async def create(cls, tmp: Path, appendonly: bool = False, **overrides: Any) -> Stack:
        redis_server = RedisServer(appendonly=appendonly)
        redis_server.start()
        dsn = database_named(fresh_database_name("w"))
        await migrate(dsn)
        settings = Settings(
            redis_url=redis_server.url, database_url=dsn, **_stack_settings(overrides))
        return cls(tmp, redis_server, settings)

    @classmethod
    async def on_cluster(cls, tmp: Path, node_url: str, broker: str = "",
                         **overrides: Any) -> Stack:
        """A stack whose ``REDIS_URL`` is a node of a Redis Cluster, under a key prefix of
        its own (its keys are deleted from every master at :meth:`close`). Dramatiq's
        broker cannot live on a cluster: ``broker`` (RabbitMQ, say), else a plain
        redis-server of the stack's own."""
        redis_server = RedisServer()
        redis_server.start()
        dsn = database_named(fresh_database_name("wc"))
        await migrate(dsn)
        settings = Settings(
            redis_url=node_url, database_url=dsn, broker_url=broker or redis_server.url,
            **_stack_settings({"buckets": 16, **overrides}))
        return cls(tmp, redis_server, settings, cluster=True)

    async def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        self.redis_server.cleanup()
        if self.cluster:
            async with self.client() as client:
                async for key in scan_keys(client, f"{self.settings.key_prefix}:*"):
                    await client.delete(key)
        await drop_database(self.settings.database_url)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        """A client of the stack's Redis (a cluster client on a cluster)."""
        client = await open_client(self.settings.redis_url)
        try:
            yield client
        finally:
            await client.aclose()

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix, self.settings.buckets)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a child: these settings, nothing inherited that could differ."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("STAKEPRO_FAULT") and k.upper() not in _SETTINGS_ENV}
        s = self.settings
        env.update({
            "REDIS_URL": s.redis_url, "DATABASE_URL": s.database_url,
            "ADMIN_TOKEN": s.admin_token, "KEY_PREFIX": s.key_prefix,
            "BROKER_URL": s.broker_url,
            "BUCKETS": str(s.buckets), "INPROCESS_PERSISTER": "false",
            "COMMISSION_FLUSH_S": str(s.commission_flush_s),
            "PERSIST_RUN_S": str(s.persist_run_s), "PERSIST_EVERY_S": str(s.persist_every_s),
            "PERSIST_SHARDS": str(s.persist_shards), "HOST": s.host, "PORT": str(s.port),
            "REDIS_DURABILITY": s.redis_durability,
            "LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1",
            **{k.upper(): str(v).lower() if isinstance(v, bool) else str(v)
               for k, v in TEST_SETTINGS.items() if k != "admin_token"},
        })
        env.update(extra)
        return env

    def spawn(self, name: str, argv: list[str], **extra: str) -> Proc:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=self.env(**extra),
                                     stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def worker(self, fault: str = "", **extra: str) -> Proc:
        """``dramatiq workers.actors``: one process, four threads (like ``make run``)."""
        if fault:
            marks = self.tmp / f"faults-{uuid.uuid4().hex[:6]}"
            marks.mkdir()
            extra = {"STAKEPRO_FAULT": fault, "STAKEPRO_FAULT_ONCE": str(marks), **extra}
        return self.spawn("worker", ["-m", "dramatiq", "workers.actors", "--processes", "1",
                                     "--threads", "4", "--worker-shutdown-timeout", "10000"],
                          **extra)

    def scheduler(self) -> Proc:
        return self.spawn("scheduler", ["-m", "workers.scheduler"])

    def server(self) -> Proc:
        return self.spawn("server", ["-m", "stakepro", "serve"])

    def send(self, actor: str, *args: Any) -> None:
        """Enqueue one message, as the scheduler does (a broker of our own, not the global)."""
        broker, _ = build(self.settings)
        try:
            broker.enqueue(dramatiq.Message(queue_name=queue_name(self.settings),
                                            actor_name=actor, args=args, kwargs={},
                                            options={}))
        finally:
            broker.close()

    def audit(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ops.audit"], cwd=ROOT,
                              env=self.env(), capture_output=True, text=True, timeout=120)

    def assert_audit_passes(self) -> None:
        audit = self.audit()
        assert audit.returncode == 0, audit.stdout + audit.stderr

    async def pending(self) -> int:
        async with self.client() as client:
            return await outbox.pending_count(client, self.keys)

    async def commissions_idle(self) -> bool:
        """Nothing left that could still pay or credit a commission: no outbox entry (its
        bet is not stored yet), no stored bet still due, no flush whose credit is not yet
        recorded as made (the next flush records it, workers/commissions.py)."""
        if await self.pending():
            return False
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            due = await conn.fetchval("SELECT count(*) FROM bets WHERE commission_flush IS NULL"
                                      " AND commission_to IS NOT NULL")
            uncredited = await conn.fetchval(
                "SELECT count(*) FROM commission_flushes WHERE credited_at IS NULL")
            return due == 0 and uncredited == 0
        finally:
            await conn.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log.name}) ---\n{p.tail()}" for p in self.procs)


_SETTINGS_ENV = {name.upper() for name in Settings.model_fields}


def _stack_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """What every stack's settings hold but the servers: the tests' limits, a key prefix of
    its own, quick windows, a free port."""
    return {
        **TEST_SETTINGS, "key_prefix": f"w{uuid.uuid4().hex[:6]}", "log_level": "warning",
        "buckets": 8, "inprocess_persister": False, "commission_flush_s": 0.5,
        "persist_run_s": 2.0, "persist_every_s": 0.25, "port": free_port(),
        "redis_durability": "none", **overrides,
    }


# -- the bet path without a game server ------------------------------------------------------


@dataclass
class Wallets:
    """The game server's bet path without the server: :class:`server.wallet.Wallet` on the
    Redis Cluster of ``settings``, over the bet path's cluster connection
    (server/redisrouter.py), with users, deposits and seed pairs written as the server
    writes them. For the worker tests on a cluster: the outbox entries, balances and rows
    are the real ones, so the audit can judge them."""

    settings: Settings
    redis: Client
    pool: asyncpg.Pool
    keys: Keys
    wallet: Wallet
    #: Bets sent again after an UNAVAILABLE answer.
    resent: int = 0

    @classmethod
    @asynccontextmanager
    async def on(cls, settings: Settings) -> AsyncIterator[Self]:
        redis = await open_client(settings.redis_url)
        fast = ClusterConnection(settings.redis_url, read_timeout=settings.redis_read_timeout_s)
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
        try:
            await fast.connect()
            batcher = Batcher(redis, fast)
            await batcher.load_scripts()
            keys = Keys(settings.key_prefix, settings.buckets)
            yield cls(settings, redis, pool, keys, Wallet(
                batcher, pool, keys, settings.currencies, settings.idempotency_window_s))
        finally:
            await pool.close()
            await fast.close()
            await redis.aclose()

    async def user(self, role: str = "player", parent: int | None = None, bps: int = 0) -> int:
        """A user row, marked healed in Redis, as the admin API creates one."""
        uid = int(await self.pool.fetchval(
            "INSERT INTO users (role, parent_id, commission_bps, name, token_hash)"
            " VALUES ($1, $2, $3, 'u', $4) RETURNING user_id", role, parent, bps,
            os.urandom(16)))
        await heal.mark_new(self.redis, self.keys, uid)
        return uid

    async def deposit(self, user_id: int, amount: int, currency: str = "USDT") -> int:
        return int(await self.wallet.deposit(user_id, self.settings.currencies[currency],
                                             Minor(amount), uuid.uuid4().hex))

    async def bet(self, user_id: int, amount: int, target: str = "49.50",
                  direction: str = "over", client_id: str | None = None,
                  within: float = 30.0) -> BetResult:
        """One bet, sent again with the same id while it is answered UNAVAILABLE (as a
        client does, docs/protocol.md): its result, settled once."""
        spec = validate_bet("USDT", f"{amount // 100}.{amount % 100:02d}", target, direction,
                            self.settings.currencies, self.settings.house_edge_bp)
        state = self.wallet.user(user_id)
        client_id = client_id or uuid.uuid4().hex
        deadline = time.monotonic() + within
        while True:
            try:
                return await self.wallet.bet(state, client_id, spec, "test")
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                self.resent += 1
                await asyncio.sleep(0.05)


async def direct_tree(wallets: Wallets, players: int,
                      deposit: int = 50_000) -> Tree:
    """:meth:`Tree.create` through :class:`Wallets`: the same chain and rates."""
    sm = await wallets.user("super_master", None, 30)
    m = await wallets.user("master", sm, 70)
    a = await wallets.user("agent", m, 150)
    made: list[tuple[int, str]] = []
    for _ in range(players):
        uid = await wallets.user("player", a)
        await wallets.deposit(uid, deposit)
        made.append((uid, ""))
    return Tree([(UserId(a), 150), (UserId(m), 70), (UserId(sm), 30)], made)


async def direct_play(wallets: Wallets, tree: Tree, bets: int) -> tuple[list[str], list[int]]:
    """:func:`play` through :class:`Wallets`: every player's bets one after the other, the
    players at once."""
    ids: list[str] = []
    stakes: list[int] = []

    async def one(uid: int) -> None:
        for i in range(bets):
            amount = 100 + 37 * i
            result = await wallets.bet(uid, amount, direction="under" if i % 2 else "over")
            ids.append(result.bet_id)
            stakes.append(amount)

    await asyncio.gather(*(one(uid) for uid, _ in tree.players))
    return ids, stakes


# -- a small agent tree and its bets ---------------------------------------------------------


@dataclass
class Tree:
    """super master -> master -> agent -> players, with commission bps on each ancestor."""

    chain: list[tuple[UserId, int]]  # nearest first: agent, master, super master
    players: list[tuple[int, str]]

    @classmethod
    async def create(cls, api: Api, players: int, deposit: str = "500.00") -> Tree:
        sm, _ = await api.create_user("super_master", commission_bps=30)
        m, _ = await api.create_user("master", parent_id=sm, commission_bps=70)
        a, _ = await api.create_user("agent", parent_id=m, commission_bps=150)
        made = [await api.player(deposit=deposit, parent_id=a) for _ in range(players)]
        return cls([(UserId(a), 150), (UserId(m), 70), (UserId(sm), 30)], made)

    def expected(self, amounts: list[int]) -> dict[int, int]:
        """Commission each ancestor earns on these stakes (minor units, USDT)."""
        owed = {int(uid): 0 for uid, _ in self.chain}
        for amount in amounts:
            for uid, paid in split(Minor(amount), self.chain):
                owed[int(uid)] += int(paid)
        return owed


async def earned(pool: asyncpg.Pool, users: list[int]) -> dict[int, int]:
    rows = await pool.fetch(
        "SELECT user_id, earned FROM commission_totals WHERE currency = 'USDT'"
        " AND user_id = ANY($1::bigint[])", users)
    out = dict.fromkeys(users, 0)
    out.update({int(r["user_id"]): int(r["earned"]) for r in rows})
    return out


async def redis_balances(stack: Stack, users: list[int]) -> dict[int, int]:
    async with stack.client() as client:
        out = {}
        for uid in users:
            raw: Any = await client.hget(stack.keys.balances(uid), "USDT")
            out[uid] = int(raw or 0)
        return out


async def bet_counts(pool: asyncpg.Pool, bet_ids: list[str]) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT bet_id, count(*) AS n FROM bets WHERE bet_id = ANY($1::text[]) GROUP BY bet_id",
        bet_ids)
    return {r["bet_id"]: int(r["n"]) for r in rows}


async def betting_tree(api: Api, players: int,
                       bets: int) -> tuple[Tree, list[str], list[int]]:
    """A new :class:`Tree` with ``players`` players who made ``bets`` bets each: the tree,
    the acknowledged bet ids and their stakes."""
    tree = await Tree.create(api, players)
    ids, stakes = await play(api, tree, bets)
    return tree, ids, stakes


async def play(api: Api, tree: Tree, bets: int) -> tuple[list[str], list[int]]:
    """``bets`` bets for each player; returns the acknowledged bet ids and stakes."""
    ids: list[str] = []
    stakes: list[int] = []

    async def one(token: str) -> None:
        async with api.play(token) as p:
            for i in range(bets):
                amount = 100 + 37 * i  # 1.00, 1.37, ... (minor units below)
                reply = await p.bet(amount=f"{amount // 100}.{amount % 100:02d}",
                                    target="49.50", direction="under" if i % 2 else "over")
                assert reply["type"] == "bet_result", reply
                ids.append(reply["bet_id"])
                stakes.append(amount)

    await asyncio.gather(*(one(token) for _, token in tree.players))
    return ids, stakes


async def persisted_once(stack: Stack, pool: asyncpg.Pool, ids: list[str],
                         drained: bool = False, within: float = 20.0) -> None:
    """Wait until every bet of ``ids`` is in ``bets`` exactly once (and, with ``drained``,
    the outbox is empty too)."""

    async def all_in() -> bool:
        return await bet_counts(pool, ids) == dict.fromkeys(ids, 1) and (
            not drained or await stack.pending() == 0)

    await eventually(all_in, within)


async def paid_exactly(pool: asyncpg.Pool, stack: Stack, tree: Tree, stakes: list[int],
                       nudge: Callable[[], None] | None = None) -> None:
    """Every ancestor earned exactly its shares of ``stakes``, in PostgreSQL and in Redis,
    and still does two flush windows later (nothing paid twice). ``nudge`` runs at each
    look (without a scheduler: enqueue a flush)."""
    owed = tree.expected(stakes)
    ancestors = list(owed)

    async def settled() -> bool:
        if nudge is not None:
            nudge()
        return (await earned(pool, ancestors) == owed
                and await redis_balances(stack, ancestors) == owed)

    await eventually(settled)
    await asyncio.sleep(2 * stack.settings.commission_flush_s)  # and stays so (no double)
    assert await earned(pool, ancestors) == owed
    assert await redis_balances(stack, ancestors) == owed


async def recovered(stack: Stack, pool: asyncpg.Pool, tree: Tree, ids: list[str],
                    stakes: list[int]) -> None:
    """Every bet once, outbox empty, every commission once, and the audit passes."""
    await persisted_once(stack, pool, ids, drained=True)
    await paid_exactly(pool, stack, tree, stakes)
    stack.assert_audit_passes()


async def persisted_stakes(pool: asyncpg.Pool, user_ids: list[int]) -> list[int]:
    rows = await pool.fetch("SELECT amount FROM bets WHERE user_id = ANY($1::bigint[])",
                            user_ids)
    return [int(r["amount"]) for r in rows]


#: The last differences ledger_equals_redis found (for the failure message).
DIFF: list[Any] = []


async def ledger_equals_redis(stack: Stack, pool: asyncpg.Pool, users: list[int]) -> bool:
    async with stack.client() as client:
        return await ledger_matches(client, stack.keys, pool, users)


async def ledger_matches(client: Client, keys: Keys, pool: asyncpg.Pool,
                         users: list[int]) -> bool:
    """Whether each user's Redis balances equal the ledger's sums (differences in DIFF)."""
    rows = await pool.fetch(
        "SELECT user_id, currency, sum(delta)::bigint AS total FROM ledger"
        " WHERE user_id = ANY($1::bigint[]) GROUP BY user_id, currency", users)
    ledger: dict[int, dict[str, int]] = {u: {} for u in users}
    for r in rows:
        ledger[int(r["user_id"])][r["currency"]] = int(r["total"])
    DIFF.clear()
    for u in users:
        raw: Any = await client.hgetall(keys.balances(u))
        have = {k.decode(): int(v) for k, v in raw.items() if int(v)}
        want = {c: v for c, v in ledger[u].items() if v}
        if have != want:
            DIFF.append((u, have, want))
    return not DIFF
