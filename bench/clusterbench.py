"""Redis clients for the bet path, on one Redis and on a 3-master Redis Cluster (issue 13).

Every run drives the real ``lua/bet-n.lua`` with the server's KEYS/ARGV shape (four keys,
one idempotency key per bet, the four leading arguments and seven per bet, as
server.wallet builds them) from ``--inflight`` coroutines, each betting for a user of its
own in a closed loop. The calls made during one event-loop tick go out as one batch (the
server's Batcher and Wallet do the same), through one of the candidate clients:

``fast``     server.resp.FastConnection (hiredis, one write per batch, replies handed over
             as they arrive). On a cluster: :class:`SlotRouter`, a prototype that reads the
             slot map once (CLUSTER SHARDS), keeps one FastConnection per master, splits a
             tick's batch by key slot and writes each node's part in one write.
``router``   the built cluster path, server.redisrouter.ClusterConnection (on one Redis:
             FastConnection, as the server picks).
``redispy``  redis-py's asyncio client: ``Redis.pipeline(transaction=False)`` on one Redis,
             ``redis.asyncio.cluster.RedisCluster.pipeline()`` on the cluster.
``coredis``  coredis' ``Redis`` / ``RedisCluster`` pipelines (not in the lock: install it
             apart, ``pip install --target DIR coredis``, and pass ``--extra-path DIR``).

``--window`` is the overlap lever: 1 means a tick's batch waits until every reply of the
previous batch is back (the client and Redis take turns); 0 means every tick's batch goes
out at once, while earlier replies are still coming back.

Per run: bets/s, the client's CPU per bet (time.process_time), Redis CPU per bet (INFO cpu
summed over the masters), p50 and p99 of one call's latency, and the mean batch (bets per
tick's batch, split over the nodes on a cluster). Every reply must be
SETTLED; the run fails otherwise. It starts its own servers on free loopback ports
(tests/rediscluster.py for the cluster) and removes them at the end::

    python -m bench.clusterbench --seconds 6 --extra-path /tmp/coredis_site
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from bench.durability import Server
from plumbing import scripts
from plumbing.keys import Keys
from server.redisconn import RunId
from server.redisrouter import ClusterConnection
from server.resp import Command, FastConnection, OnReply
from tests.rediscluster import RedisCluster

KEYS = Keys("cb", 64)
RID = "bench-run"  # stored with every seed pair and passed as ARGV[2]: no EPOCH refusals
START = 10**15
WINDOW_MS = "10000"

Batch = list[tuple[Command, asyncio.Future[Any]]]
Send = Callable[[Batch], Awaitable[None]]


# -- the slot-routing prototype -----------------------------------------------------------


def _pairs(flat: list[Any]) -> dict[bytes, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class SlotRouter:
    """FastConnection per master, commands routed by the slot of their first key.

    A prototype for the measurement only: no MOVED/ASK, no map refresh, no failover."""

    def __init__(self, url: str) -> None:
        self.seed = FastConnection(url, RunId())
        self.owner: list[FastConnection] = []

    async def connect(self) -> None:
        (shards,) = await self.seed.execute([("CLUSTER", "SHARDS")])
        by_addr: dict[tuple[str, int], FastConnection] = {}
        owner: list[FastConnection | None] = [None] * 16384
        for shard in shards:
            fields = _pairs(shard)
            master = next(
                _pairs(n) for n in fields[b"nodes"] if _pairs(n)[b"role"] == b"master"
            )
            addr = (master[b"ip"].decode(), int(master[b"port"]))
            if addr not in by_addr:
                by_addr[addr] = FastConnection(f"redis://{addr[0]}:{addr[1]}/0", RunId())
                await by_addr[addr].connect()
            ranges = fields[b"slots"]
            for start, end in zip(ranges[::2], ranges[1::2], strict=True):
                for slot in range(int(start), int(end) + 1):
                    owner[slot] = by_addr[addr]
        if any(o is None for o in owner):
            raise RuntimeError("not every slot has a master")
        self.owner = [o for o in owner if o is not None]
        await self.seed.close()

    def send_now(self, commands: list[Command], on_reply: OnReply) -> None:
        groups: dict[int, tuple[FastConnection, list[Command], list[int]]] = {}
        for i, command in enumerate(commands):
            key = command[3]  # EVALSHA sha numkeys key1 ...
            conn = self.owner[key_slot(key.encode() if isinstance(key, str) else bytes(key))]
            group = groups.setdefault(id(conn), (conn, [], []))
            group[1].append(command)
            group[2].append(i)
        for conn, part, index in groups.values():
            conn.send_now(part, _remap(on_reply, index))


def _remap(on_reply: OnReply, index: list[int]) -> OnReply:
    def answer(j: int, reply: Any) -> None:
        on_reply(index[j], reply)

    return answer


# -- the candidates' batch senders --------------------------------------------------------


def _resolve(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():
        return
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)


def fast_sender(conn: FastConnection | SlotRouter | ClusterConnection) -> Send:
    async def send(batch: Batch) -> None:
        done = asyncio.get_running_loop().create_future()
        left = len(batch)

        def on_reply(i: int, reply: Any) -> None:
            nonlocal left
            _resolve(batch[i][1], reply)
            left -= 1
            if left == 0 and not done.done():
                done.set_result(None)

        conn.send_now([c for c, _ in batch], on_reply)
        await done

    return send


def redispy_sender(client: aioredis.Redis | AsyncCluster) -> Send:
    async def send(batch: Batch) -> None:
        pipe: Any = (
            client.pipeline() if isinstance(client, AsyncCluster)
            else client.pipeline(transaction=False)
        )
        for command, _ in batch:
            pipe.execute_command(*command)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            replies = [exc] * len(batch)
        for (_, future), reply in zip(batch, replies, strict=True):
            _resolve(future, reply)

    return send


def coredis_sender(client: Any) -> Send:
    async def send(batch: Batch) -> None:
        requests = []
        async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
            for command, _ in batch:
                n = int(command[2])
                requests.append(pipe.evalsha(command[1], keys=command[3:3 + n],
                                             args=command[3 + n:]))
        for (_, future), request in zip(batch, requests, strict=True):
            try:
                _resolve(future, await request)
            except Exception as exc:
                _resolve(future, exc)

    return send


class Ticker:
    """One batch per loop tick; at most ``window`` batches in flight (0: no limit)."""

    def __init__(self, send: Send, window: int) -> None:
        self.send = send
        self.window = window
        self.queue: Batch = []
        self.inflight = 0
        self.scheduled = False
        self.batches = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def call(self, command: Command) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.queue.append((command, future))
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self.flush)
        return future

    def flush(self) -> None:
        self.scheduled = False
        if not self.queue or (self.window and self.inflight >= self.window):
            return
        batch, self.queue = self.queue, []
        self.batches += 1
        self.inflight += 1
        task = asyncio.create_task(self._run(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: Batch) -> None:
        try:
            await self.send(batch)
        finally:
            self.inflight -= 1
            if self.queue and not self.scheduled:
                self.scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)


# -- the load -----------------------------------------------------------------------------


def bet_command(sha: str, uid: int, nonce: int, event: bytes) -> Command:
    """One bet of ``uid`` at stored nonce ``nonce``, as server.wallet.Wallet._flush builds it."""
    return (
        "EVALSHA", sha, 6, KEYS.balances(uid), KEYS.seed(uid), KEYS.outbox_for(uid),
        KEYS.user_channel(uid), KEYS.healed(uid), KEYS.bet_idem(uid, nonce + 1),
        str(uid), RID, WINDOW_MS, "0",
        "USDT", "100", "-100", str(nonce), "USDT|100|5000|under", event, "bench:1",
    )


EVENT = msgpack.packb({
    "bet_id": "123-45", "user_id": 1, "pair_id": 123, "currency": "USDT", "amount": 100,
    "payout": 0, "roll": 6410, "target": 5000, "direction": "under", "nonce": 45,
    "multiplier": 19801, "server_seed_hash": "b" * 64, "client_seed": "client",
    "ts": 1764000000000,
})


async def setup(masters: list[aioredis.Redis], users: int) -> None:
    """Empty every master, load the script, give each user a balance and a seed pair."""
    for m in masters:
        await m.flushall()
        await m.script_load(scripts.BET.source)
    by_master: dict[int, Any] = {}
    for uid in range(1, users + 1):
        slot = key_slot(KEYS.balances(uid).encode())
        for i, m in enumerate(masters):
            if len(masters) == 1 or slot in MASTER_SLOTS[i]:
                pipe = by_master.setdefault(i, m.pipeline(transaction=False))
                pipe.hset(KEYS.balances(uid), "USDT", str(START))
                pipe.hset(KEYS.seed(uid), mapping={"pid": str(uid), "ss": "s", "sh": "h",
                                                   "cs": "c", "n": "0", "rid": RID})
                pipe.set(KEYS.healed(uid), RID)
    for pipe in by_master.values():
        await pipe.execute()


MASTER_SLOTS: list[set[int]] = []


async def cpu(masters: list[aioredis.Redis]) -> float:
    total = 0.0
    for m in masters:
        info = await m.info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


@dataclass
class Result:
    bets: int
    seconds: float
    client_cpu: float
    redis_cpu: float
    latencies: list[float]
    batches: int

    def row(self) -> str:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000
        return (f"{self.bets / self.seconds:9.0f} {self.client_cpu / self.bets * 1e6:9.1f}"
                f" {self.redis_cpu / self.bets * 1e6:9.1f}"
                f" {statistics.median(lat) * 1000:7.2f} {p99:7.2f} {self.bets / self.batches:6.0f}")


async def drive(ticker: Ticker, inflight: int, seconds: float,
                masters: list[aioredis.Redis]) -> Result:
    sha = scripts.BET.sha
    stop = time.monotonic() + seconds
    latencies: list[float] = []

    async def player(uid: int) -> int:
        nonce = 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            reply = await ticker.call(bet_command(sha, uid, nonce, EVENT))
            latencies.append(time.perf_counter() - t0)
            if int(reply[0][0]) != 0:
                raise RuntimeError(f"user {uid}: bet not settled: {reply!r}")
            nonce += 1
        return nonce

    cpu0, wall0, redis0 = time.process_time(), time.monotonic(), await cpu(masters)
    counts = await asyncio.gather(*(player(u) for u in range(1, inflight + 1)))
    wall = time.monotonic() - wall0
    client = time.process_time() - cpu0
    return Result(sum(counts), wall, client, await cpu(masters) - redis0, latencies,
                  ticker.batches)


async def make_client(kind: str, target: str, url: str) -> tuple[Send, Callable[[], Awaitable[
        None]]]:
    """The batch sender of ``kind`` on ``url`` and how to close it."""
    if kind in ("fast", "router"):
        conn: FastConnection | SlotRouter | ClusterConnection = FastConnection(url, RunId())
        if target == "cluster":
            conn = SlotRouter(url) if kind == "fast" else ClusterConnection(url)
        await conn.connect()

        async def close_fast() -> None:
            if isinstance(conn, SlotRouter):
                for c in set(conn.owner):
                    await c.close()
            else:
                await conn.close()

        return fast_sender(conn), close_fast
    if kind == "redispy":
        client: aioredis.Redis | AsyncCluster = (
            AsyncCluster.from_url(url) if target == "cluster" else aioredis.Redis.from_url(url)
        )
        if isinstance(client, AsyncCluster):
            await client.initialize()
        return redispy_sender(client), client.aclose
    coredis = importlib.import_module("coredis")
    cls = coredis.RedisCluster if target == "cluster" else coredis.Redis
    core = cls.from_url(url)
    stack = core.__asynccontextmanager__()
    await stack.__aenter__()

    async def close_core() -> None:
        await stack.__aexit__(None, None, None)

    return coredis_sender(core), close_core


async def run(args: argparse.Namespace) -> None:
    print(f"{'target':8} {'client':8} {'window':6} {'bets/s':>9} {'client us':>9}"
          f" {'redis us':>9} {'p50 ms':>7} {'p99 ms':>7} {'batch':>6}", flush=True)
    for target in args.targets.split(","):
        cluster = RedisCluster() if target == "cluster" else None
        single = Server("off") if target == "single" else None
        try:
            if cluster is not None:
                cluster.start()
                url = cluster.url
                ports = [n.port for n in cluster.masters()]
            else:
                assert single is not None
                single.start()
                url, ports = single.url, [single.port]
            masters = [aioredis.Redis(host="127.0.0.1", port=p) for p in ports]
            MASTER_SLOTS.clear()
            if cluster is not None:
                shards = await masters[0].execute_command(  # type: ignore[no-untyped-call]
                    "CLUSTER", "SLOTS")
                for port in ports:
                    owned: set[int] = set()
                    for start, end, master, *_ in shards:
                        if int(master[1]) == port:
                            owned.update(range(int(start), int(end) + 1))
                    MASTER_SLOTS.append(owned)
            for kind in args.clients.split(","):
                for window in (int(w) for w in args.windows.split(",")):
                    try:
                        send, close = await make_client(kind, target, url)
                    except ImportError as exc:
                        print(f"{target:8} {kind:8} not installed ({exc})", flush=True)
                        break
                    try:
                        await setup(masters, args.inflight)
                        result = await drive(Ticker(send, window), args.inflight,
                                             args.seconds, masters)
                    finally:
                        await close()
                    print(f"{target:8} {kind:8} {window or 'all':>6} {result.row()}",
                          flush=True)
            for m in masters:
                await m.aclose()
        finally:
            if cluster is not None:
                cluster.cleanup()
            if single is not None:
                single.stop()
                shutil.rmtree(single.dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="single,cluster")
    parser.add_argument("--clients", default="fast,router,redispy,coredis")
    parser.add_argument("--windows", default="1,2,0", help="batches in flight (0: no limit)")
    parser.add_argument("--inflight", type=int, default=400, help="users betting at once")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--extra-path", help="a directory with coredis (appended to sys.path)")
    args = parser.parse_args()
    if args.extra_path:
        sys.path.append(args.extra_path)
    try:
        import uvloop

        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
