"""Measure the three ways the roll can meet the nonce (docs/decisions.md, DESIGN.md point 7).

A  hmac_in_lua.lua: one call; Redis computes HMAC-SHA256 and the roll in Lua.
B  two_step_reserve.lua + two_step_settle.lua: reserve (nonce, stake, pending record), roll
   in Python, settle (payout, outbox); two calls per bet.
C  lua/bet-n.lua through the real server.wallet.Wallet: roll in Python for the expected
   nonce, one call that settles only if the pair and nonce still hold.

Every design sends its calls through server.redisbatch.Batcher (one pipeline per loop tick)
from ``--concurrency`` coroutines betting for ``--users`` simulated users. Per run it reports
bets/s end to end, Redis CPU (INFO cpu) per 1,000 bets, script execution time per bet (INFO
commandstats, EVALSHA usec: the Lua-only cost, whose inverse is the Lua-only ceiling of one
Redis core), and the client's Python CPU per bet (time.process_time).

Before the runs it checks design A's rolls against games.dice (the shared vectors and a few
hundred nonces) and B's recovery sweep; ``--verify`` does only that. Loopback Redis only; it
FLUSHes the selected database, so give it a Redis of its own::

    python -m bench.prototypes.bench --redis-url redis://127.0.0.1:6395/0 \\
        --bets 200000 --concurrency 100
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import asyncpg
import msgpack
import redis.asyncio as aioredis

from games import dice, seeds
from games.bets import BetSpec, fingerprint, settle, validate_bet
from games.money import DEFAULT_CURRENCIES
from games.types import Direction, Hundredths, Minor, MultiplierBp
from loadtest.serverstats import is_loopback
from plumbing import scripts
from plumbing.keys import Keys
from plumbing.scripts import Script
from server.redisbatch import Batcher
from server.redisconn import RunId
from server.resp import FastConnection
from server.wallet import Pair, UserState, Wallet

HERE = Path(__file__).resolve().parent
VECTORS = Path(__file__).resolve().parents[2] / "tests" / "vectors" / "dice.json"
PREFIX = "pb"
BUCKETS = 64
WINDOW_S = 300
START_BALANCE = 10**12
USDT = DEFAULT_CURRENCIES["USDT"]


def _script(filename: str) -> Script:
    source = (HERE / filename).read_text()
    return Script(filename, source, hashlib.sha1(source.encode()).hexdigest())


HMAC_IN_LUA = _script("hmac_in_lua.lua")
RESERVE = _script("two_step_reserve.lua")
SETTLE = _script("two_step_settle.lua")
PROTOTYPES = (HMAC_IN_LUA, RESERVE, SETTLE)
KEYS = Keys(PREFIX, BUCKETS)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def pending_key(uid: int, cid: int) -> str:
    return f"{PREFIX}:pend:{KEYS.tag(uid)}:{uid}:i:{cid}"


def pending_index(uid: int) -> str:
    return f"{PREFIX}:pending:{KEYS.tag(uid)}"


def now_ms() -> int:
    return int(time.time() * 1000)


# -- the three bet paths ------------------------------------------------------------------


@dataclass
class Ctx:
    batcher: Batcher
    wallet: Wallet
    states: dict[int, UserState]
    pairs: dict[int, Pair]
    delta: int = 0  # sum of (payout - stake) settled, for the conservation check
    stale: int = 0


async def bet_a(ctx: Ctx, uid: int, cid: int, spec: BetSpec) -> None:
    keys = (
        KEYS.balances(uid), KEYS.seed(uid), KEYS.bet_idem(uid, cid),
        KEYS.outbox_for(uid), KEYS.user_channel(uid),
    )
    args = (
        spec.currency.code, str(spec.amount), str(spec.target), spec.direction,
        str(spec.multiplier), fingerprint(spec), str(WINDOW_S * 1000), "bench", uid, now_ms(),
    )
    reply = await ctx.batcher.run(HMAC_IN_LUA, keys, args)
    if reply[0] != 0:
        raise RuntimeError(f"A: unexpected reply {reply!r}")
    ctx.delta += int(reply[4]) - spec.amount


def _blobs(
    uid: int, pair: Pair, nonce: int, spec: BetSpec, roll: Hundredths, payout: int
) -> tuple[bytes, bytes]:
    """The replay record and the outbox event, built exactly as server.wallet does."""
    bet_id = f"{pair.pid}-{nonce}"
    stored = msgpack.packb(
        [bet_id, roll, payout > 0, spec.multiplier, payout, nonce,
         pair.server_seed_hash, pair.client_seed]
    )
    event = msgpack.packb(
        {
            "bet_id": bet_id, "user_id": uid, "pair_id": int(pair.pid),
            "currency": spec.currency.code, "amount": spec.amount, "payout": payout,
            "roll": roll, "target": spec.target, "direction": spec.direction, "nonce": nonce,
            "multiplier": spec.multiplier, "server_seed_hash": pair.server_seed_hash,
            "client_seed": pair.client_seed, "ts": now_ms(),
        }
    )
    return stored, event


async def settle_pending(
    batcher: Batcher, uid: int, cid: int, pair: Pair, nonce: int, spec: BetSpec, origin: str
) -> tuple[list[Any], int]:
    """B's second step: the deterministic outcome of (pair, nonce), then settle-6."""
    roll = dice.roll(pair.server_seed, pair.client_seed, nonce)
    outcome = settle(spec, roll)
    stored, event = _blobs(uid, pair, nonce, spec, roll, outcome.payout)
    keys = (
        KEYS.balances(uid), pending_key(uid, cid), KEYS.bet_idem(uid, cid),
        KEYS.outbox_for(uid), pending_index(uid), KEYS.user_channel(uid),
    )
    args = (
        spec.currency.code, str(outcome.payout), str(nonce), stored, event,
        str(WINDOW_S * 1000), origin,
    )
    return list(await batcher.run(SETTLE, keys, args)), outcome.payout


async def bet_b(ctx: Ctx, uid: int, cid: int, spec: BetSpec) -> None:
    keys = (
        KEYS.balances(uid), KEYS.seed(uid), KEYS.bet_idem(uid, cid),
        pending_key(uid, cid), pending_index(uid),
    )
    args = (
        spec.currency.code, str(spec.amount), fingerprint(spec), str(spec.target),
        spec.direction, str(spec.multiplier), now_ms(),
    )
    reply = await ctx.batcher.run(RESERVE, keys, args)
    if reply[0] != 0:
        raise RuntimeError(f"B reserve: unexpected reply {reply!r}")
    pair = ctx.pairs[uid]  # the server's copy; a pair id it does not know would be loaded
    if _text(reply[1]) != pair.pid:
        raise RuntimeError("B: pair changed (no rotation in this bench)")
    done, payout = await settle_pending(ctx.batcher, uid, cid, pair, int(reply[2]), spec, "bench")
    if done[0] != 0:
        raise RuntimeError(f"B settle: unexpected reply {done!r}")
    ctx.delta += payout - spec.amount


async def bet_c(ctx: Ctx, uid: int, cid: int, spec: BetSpec) -> None:
    result = await ctx.wallet.bet(ctx.states[uid], cid, spec, "bench")
    ctx.delta += result.payout - spec.amount


BET: dict[str, Callable[[Ctx, int, int, BetSpec], Awaitable[None]]] = {
    "A": bet_a, "B": bet_b, "C": bet_c,
}
NAMES = {
    "A": "hmac_in_lua (1 call, HMAC in Lua)",
    "B": "two_step (2 calls, pending record)",
    "C": "bet-n (1 call, roll in Python)",
}


# -- setup, measurement -------------------------------------------------------------------


def make_specs(rng: random.Random, n: int = 512) -> list[BetSpec]:
    specs: list[BetSpec] = []
    while len(specs) < n:
        direction = rng.choice(("under", "over"))
        target = rng.randint(200, 9800)
        amount = rng.randint(1, 100_000)
        spec = validate_bet(
            "USDT", f"{amount // 100}.{amount % 100:02d}",
            dice.format_hundredths(target), direction, DEFAULT_CURRENCIES,
        )
        specs.append(spec)
    return specs


async def setup_users(client: aioredis.Redis, users: int) -> dict[int, Pair]:
    await client.flushdb()
    run_id = str((await client.info("server"))["run_id"])
    pairs: dict[int, Pair] = {}
    for start in range(1, users + 1, 1000):
        pipe = client.pipeline(transaction=False)
        for uid in range(start, min(start + 1000, users + 1)):
            ss = seeds.new_server_seed()
            pair = Pair(str(uid), ss, seeds.server_seed_hash(ss), f"client-seed-{uid}", 0)
            pairs[uid] = pair
            pipe.hset(KEYS.seed(uid), mapping={
                "pid": pair.pid, "ss": ss, "sh": pair.server_seed_hash,
                "cs": pair.client_seed, "n": "0", "rid": run_id,
            })
            pipe.hset(KEYS.balances(uid), "USDT", str(START_BALANCE))
            pipe.set(KEYS.healed(uid), run_id)  # bet-n refuses (HEAL) users not healed
        await pipe.execute()
    return pairs


async def redis_cpu(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def evalsha_stats(client: aioredis.Redis) -> tuple[int, int]:
    info = await client.info("commandstats")
    stat = info.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(stat["calls"]), int(stat["usec"])


async def check_state(client: aioredis.Redis, users: int, bets: int, delta: int) -> list[str]:
    """Nonces used, outbox length, no pending left, money conserved."""
    problems = []
    pipe = client.pipeline(transaction=False)
    for uid in range(1, users + 1):
        pipe.hget(KEYS.seed(uid), "n")
        pipe.hget(KEYS.balances(uid), "USDT")
    raw = await pipe.execute()
    nonces, balances = sum(int(x) for x in raw[::2]), sum(int(x) for x in raw[1::2])
    outbox = sum([await client.xlen(k) for k in KEYS.all_outboxes()])
    pending = sum([await client.zcard(f"{PREFIX}:pending:{{b{b}}}") for b in range(BUCKETS)])
    if nonces != bets:
        problems.append(f"nonces used {nonces} != bets {bets}")
    if outbox != bets:
        problems.append(f"outbox entries {outbox} != bets {bets}")
    if pending:
        problems.append(f"{pending} pending records left")
    if balances != users * START_BALANCE + delta:
        problems.append(f"balances {balances} != start + settled delta {delta}")
    return problems


@dataclass
class Run:
    design: str
    bets: int
    wall_s: float
    redis_cpu_s: float
    client_cpu_s: float
    evalsha_calls: int
    evalsha_usec: int
    problems: list[str] = field(default_factory=list)

    @property
    def bets_per_s(self) -> float:
        return self.bets / self.wall_s

    @property
    def redis_cpu_ms_per_1000(self) -> float:
        return self.redis_cpu_s / self.bets * 1e6  # seconds per bet * 1000 bets * 1000 ms

    @property
    def redis_cpu_ceiling(self) -> float:
        return self.bets / self.redis_cpu_s

    @property
    def lua_us_per_bet(self) -> float:
        return self.evalsha_usec / self.bets

    @property
    def lua_ceiling(self) -> float:
        return 1e6 / self.lua_us_per_bet

    @property
    def client_us_per_bet(self) -> float:
        return self.client_cpu_s / self.bets * 1e6


async def run_once(
    client: aioredis.Redis, design: str, args: argparse.Namespace, specs: list[BetSpec]
) -> Run:
    pairs = await setup_users(client, args.users)
    batcher = Batcher(client, FastConnection(args.redis_url, RunId()))
    wallet = Wallet(
        batcher, cast(asyncpg.Pool, None), KEYS, dict(DEFAULT_CURRENCIES), WINDOW_S
    )
    states = {uid: wallet.user(uid) for uid in pairs}  # strong refs keep the weak dict filled
    for uid, state in states.items():
        state.pair = Pair(**{f: getattr(pairs[uid], f) for f in Pair.__slots__})
    ctx = Ctx(batcher, wallet, states, pairs)
    bet = BET[design]
    issued = 0
    deadline = time.monotonic() + args.max_seconds

    async def worker() -> int:
        nonlocal issued
        done = 0
        while issued < args.bets and time.monotonic() < deadline:
            i = issued
            issued += 1
            await bet(ctx, i % args.users + 1, i, specs[i % len(specs)])
            done += 1
        return done

    await client.config_resetstat()
    cpu0, p0, t0 = await redis_cpu(client), time.process_time(), time.perf_counter()
    counts = await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    t1, p1 = time.perf_counter(), time.process_time()
    cpu1 = await redis_cpu(client)
    calls, usec = await evalsha_stats(client)
    bets = sum(counts)
    run = Run(design, bets, t1 - t0, cpu1 - cpu0, p1 - p0, calls, usec)
    run.problems = await check_state(client, args.users, bets, ctx.delta)
    return run


# -- correctness checks -------------------------------------------------------------------


async def verify(client: aioredis.Redis, vectors: list[dict[str, Any]]) -> bool:
    """Design A's rolls, payouts and events against games.dice; B's recovery sweep."""
    await client.flushdb()
    kw = client.connection_pool.connection_kwargs
    url = f"redis://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    batcher = Batcher(client, FastConnection(url, RunId()))
    ok = fails = 0
    spec = validate_bet("USDT", "1.00", "50.00", "under", DEFAULT_CURRENCIES)
    uid = 1

    async def check(ss: str, cs: str, first_nonce: int, count: int, expect: list[str]) -> None:
        nonlocal ok, fails
        await client.hset(KEYS.seed(uid), mapping={
            "pid": "7", "ss": ss, "sh": seeds.server_seed_hash(ss), "cs": cs,
            "n": str(first_nonce - 1),
        })
        await client.hset(KEYS.balances(uid), "USDT", str(START_BALANCE))
        balance = START_BALANCE
        for k in range(count):
            nonce = first_nonce + k
            cid = f"v{nonce}-{os.urandom(4).hex()}"
            keys = (KEYS.balances(uid), KEYS.seed(uid), KEYS.bet_idem(uid, cid),
                    KEYS.outbox_for(uid), KEYS.user_channel(uid))
            args = ("USDT", str(spec.amount), str(spec.target), spec.direction,
                    str(spec.multiplier), fingerprint(spec), "60000", "v", uid, 0)
            reply = await batcher.run(HMAC_IN_LUA, keys, args)
            roll = dice.roll(ss, cs, nonce)
            outcome = settle(spec, roll)
            balance += outcome.payout - spec.amount
            got = (int(reply[0]), int(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]))
            want = (0, balance, nonce, roll, outcome.payout)
            vector_ok = not expect or dice.format_hundredths(got[3]) == expect[k]
            if got == want and vector_ok:
                ok += 1
            else:
                fails += 1
                print(f"  FAIL {cs!r} nonce {nonce}: lua {got} python {want} vector {expect}")

    for v in vectors:
        await check(v["server_seed"], v["client_seed"], v["nonce"], 1, [v["roll"]])
    rng = random.Random(7)
    for cs in ("player-chosen-seed", "ü-ñ-€ seed", "x" * 80):
        ss = rng.randbytes(32).hex()
        await check(ss, cs, 1, 100, [])
    await check(rng.randbytes(32).hex(), "big", 999_999_990, 20, [])
    print(f"verify A rolls/payouts vs games.dice: {'OK' if fails == 0 else 'FAIL'}"
          f" ({ok} agree, {fails} differ; {len(vectors)} shared vectors included)")

    # The stored replay record and the outbox event carry what server.wallet writes.
    newest: Any = await client.xrevrange(KEYS.outbox_for(uid), count=1)
    event = msgpack.unpackb(newest[0][1][b"e"])
    wanted = {"bet_id", "user_id", "pair_id", "currency", "amount", "payout", "roll", "target",
              "direction", "nonce", "multiplier", "server_seed_hash", "client_seed", "ts"}
    ss_now, cs_now = (_text(x) for x in await client.hmget(KEYS.seed(uid), "ss", "cs"))
    same_fields = set(event) == wanted and event["roll"] == dice.roll(
        ss_now, cs_now, event["nonce"]
    )
    print(f"verify A outbox event fields and roll: {'OK' if same_fields else 'FAIL'}")

    swept = await verify_sweep(client, batcher)
    print(f"verify B crash after reserve, recovery sweep settles exactly once: "
          f"{'OK' if swept else 'FAIL'}")
    return fails == 0 and same_fields and swept


async def sweep(client: aioredis.Redis, batcher: Batcher, older_than_ms: int) -> int:
    """B's recovery: settle every pending record older than the cut-off, deterministically.

    A real sweep reads the server seed of the record's pair id from PostgreSQL (seed_pairs),
    since the pair may have been rotated since; here it is still the active one in Redis.
    """
    settled = 0
    for b in range(BUCKETS):
        index = f"{PREFIX}:pending:{{b{b}}}"
        for member in await client.zrangebyscore(index, 0, now_ms() - older_than_ms):
            key = _text(member)
            rec = {_text(k): _text(v) for k, v in (await client.hgetall(key)).items()}
            if not rec:
                continue
            _, _, _, uid_s, _, cid_s = key.split(":")
            uid, cid = int(uid_s), int(cid_s)
            raw = {_text(k): _text(v) for k, v in (await client.hgetall(KEYS.seed(uid))).items()}
            pair = Pair(rec["pid"], raw["ss"], raw["sh"], raw["cs"], 0)
            spec = BetSpec(USDT, Minor(int(rec["a"])), Hundredths(int(rec["t"])),
                           cast(Direction, rec["d"]), 0, MultiplierBp(int(rec["m"])))
            reply, _ = await settle_pending(batcher, uid, cid, pair, int(rec["n"]), spec, "sweep")
            settled += reply[0] == 0
    return settled


async def verify_sweep(client: aioredis.Redis, batcher: Batcher) -> bool:
    uid, cid = 2, 41
    ss = seeds.new_server_seed()
    await client.hset(KEYS.seed(uid), mapping={
        "pid": "9", "ss": ss, "sh": seeds.server_seed_hash(ss), "cs": "c", "n": "0"})
    await client.hset(KEYS.balances(uid), "USDT", "100000")
    spec = validate_bet("USDT", "10.00", "60.00", "under", DEFAULT_CURRENCIES)
    keys = (KEYS.balances(uid), KEYS.seed(uid), KEYS.bet_idem(uid, cid),
            pending_key(uid, cid), pending_index(uid))
    args = ("USDT", str(spec.amount), fingerprint(spec), str(spec.target), spec.direction,
            str(spec.multiplier), now_ms() - 5000)
    reserved = await batcher.run(RESERVE, keys, args)  # ... and the server dies here
    again = await batcher.run(RESERVE, keys, args)     # the client's resend: still pending
    first = await sweep(client, batcher, 1000)
    second = await sweep(client, batcher, 0)
    replay = await batcher.run(RESERVE, keys, args)
    payout = settle(spec, dice.roll(ss, "c", 1)).payout
    balance = int(await client.hget(KEYS.balances(uid), "USDT") or 0)
    return (
        reserved[0] == 0 and again[0] == 7 and first == 1 and second == 0
        and replay[0] == 1 and balance == 100000 - spec.amount + payout
        and await client.xlen(KEYS.outbox_for(uid)) >= 1
    )


async def micro(client: aioredis.Redis) -> tuple[float, float, float]:
    """CPU microseconds per HMAC+roll in Redis Lua (one EVAL looping), per SHA-256
    compression in Lua (an HMAC of a 64-byte key and a short message takes 4), and per
    HMAC+roll in Python (games.dice.roll)."""
    src = HMAC_IN_LUA.source
    lib = src[src.index("-- BEGIN sha256") : src.index("-- END sha256")]
    loop = lib + (
        "\nlocal acc = 0\nfor i = 1, tonumber(ARGV[3]) do\n"
        "  acc = acc + roll_from_hmac(hmac_sha256_hex(ARGV[1], ARGV[2] .. ':' .. i))\n"
        "end\nreturn acc\n"
    )
    ss, cs, n = seeds.new_server_seed(), "client-seed-1", 5000
    t0 = await redis_cpu(client)  # Redis CPU, not wall time: the machine may be shared
    total = int(await client.eval(loop, 0, ss, cs, n))
    lua_us = (await redis_cpu(client) - t0) / n * 1e6
    if total != sum(dice.roll(ss, cs, i) for i in range(1, n + 1)):
        print("micro: Lua loop disagrees with games.dice: FAIL")
    one_block = lib + (
        "\nlocal H, acc = initial(), 0\nfor i = 1, tonumber(ARGV[1]) do\n"
        "  local w = {}\n  for j = 1, 16 do w[j] = i + j end\n"
        "  compress(H, w)\n  acc = acc + 1\nend\nreturn acc\n"
    )
    t0 = await redis_cpu(client)
    await client.eval(one_block, 0, n)
    compress_us = (await redis_cpu(client) - t0) / n * 1e6
    t0 = time.process_time()
    for i in range(1, 50_001):
        dice.roll(ss, cs, i)
    py_us = (time.process_time() - t0) / 50_000 * 1e6
    return lua_us, compress_us, py_us


# -- main ---------------------------------------------------------------------------------


def _loopback(url: str) -> bool:
    return is_loopback(urlparse(url).hostname or "")


def _summary(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values),
                                              max(values)))


async def main_async(args: argparse.Namespace) -> int:
    client = aioredis.from_url(args.redis_url)
    try:
        for script in (*PROTOTYPES, *scripts.ALL):
            await client.script_load(script.source)
        good = await verify(client, args.vectors)
        if args.verify:
            return 0 if good else 1
        lua_us, compress_us, py_us = await micro(client)
        print(f"HMAC-SHA256 + roll alone: {lua_us:.1f} us in Redis Lua ({compress_us:.1f} us per"
              f" compression, 4 per HMAC), {py_us:.2f} us in Python")
        specs = make_specs(random.Random(1))
        runs: dict[str, list[Run]] = {d: [] for d in args.designs}
        for i in range(args.runs):
            for design in args.designs:  # interleaved, so drift hits every design alike
                run = await run_once(client, design, args, specs)
                runs[design].append(run)
                print(
                    f"run {i + 1} {design}: {run.bets} bets in {run.wall_s:.1f} s ="
                    f" {run.bets_per_s:,.0f}/s; redis cpu {run.redis_cpu_ms_per_1000:.1f} ms"
                    f"/1000 bets; lua {run.lua_us_per_bet:.1f} us/bet"
                    f" ({run.evalsha_calls / run.bets:.0f} calls); client"
                    f" {run.client_us_per_bet:.0f} us/bet"
                    + (f"; PROBLEMS {run.problems}" if run.problems else "; state OK"),
                    flush=True,
                )
        print(f"\n{args.runs} runs each, min / median / max; {args.bets} bets,"
              f" concurrency {args.concurrency}, {args.users} users")
        header = ("| design | bets/s end to end | Redis CPU ms per 1000 bets | Redis-CPU ceiling"
                  " bets/s | script us per bet (commandstats, wall) | Lua-only ceiling bets/s"
                  " | client CPU us per bet |")
        print(header)
        print("|" + "---|" * 7)
        for design, rs in runs.items():
            print(
                f"| {design} {NAMES[design]} | {_summary([r.bets_per_s for r in rs], ',.0f')}"
                f" | {_summary([r.redis_cpu_ms_per_1000 for r in rs], '.1f')}"
                f" | {_summary([r.redis_cpu_ceiling for r in rs], ',.0f')}"
                f" | {_summary([r.lua_us_per_bet for r in rs], '.1f')}"
                f" | {_summary([r.lua_ceiling for r in rs], ',.0f')}"
                f" | {_summary([r.client_us_per_bet for r in rs], '.0f')} |"
            )
        args.results = {d: [vars(r) for r in rs] for d, rs in runs.items()}
        return 0 if good and not any(r.problems for rs in runs.values() for r in rs) else 1
    finally:
        await client.aclose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6395/0")
    p.add_argument("--bets", type=int, default=200_000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--designs", type=lambda s: s.upper().split(","), default=["A", "B", "C"])
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="each run stops issuing bets after this long (the count is reported)")
    p.add_argument("--verify", action="store_true", help="only the correctness checks")
    p.add_argument("--json", help="write every run's figures to this file")
    args = p.parse_args()
    if not _loopback(args.redis_url):
        sys.exit("loopback Redis only (this tool FLUSHes the database)")
    if args.users < args.concurrency:
        sys.exit("--users must be at least --concurrency")
    args.vectors = json.loads(VECTORS.read_text())["rolls"] if VECTORS.exists() else []
    args.results = {}
    code = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(args.results, indent=1))
    sys.exit(code)


if __name__ == "__main__":
    main()
