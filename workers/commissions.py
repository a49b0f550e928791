"""Commissions up the agent chain: accrue per bet in Redis, flush per window to PostgreSQL.

PROTOCOL.md, "Commissions": every settled bet pays each ancestor of the player
``floor(amount * bps / 10000)`` (:mod:`games.commission` computes it), exactly once,
whatever crashes or retries happen. This module applies it, and is the only one that does:
the shares of each player (:func:`shares_of`), the increments an outbox ack adds
(:func:`increments`), and the flush. The path of one bet's commissions::

    outbox batch COMMITted (workers/outbox.py)
      -> the batch's ack: lua/outbox-ack-accrue-n.lua, one call for the batch: if every
         entry is still pending, XACK + XDEL them and HINCRBY cpend:{bN} "<ancestor>|<currency>"
         by the sum of their bets' shares (per bet floored, summed per bucket in Python)
      -> flush() every window (one flusher holds the window's lease):
         take   commission-take-3.lua per bucket: RENAME cpend:{bN} -> cbatch:{bN}:<batch>,
                SADD cbatches:{bN} <batch>; returns every unfinished batch of the bucket
         write  ONE PostgreSQL statement for every batch: commission_batches ON CONFLICT DO
                NOTHING, ledger rows and commission_totals only for the newly inserted ones
         credit commission-credit-n.lua per ancestor on its bucket: marker per
                (batch, ancestor) SET NX + HINCRBY balance + PUBLISH the push
         drop   DEL cbatch, SREM cbatches

Why it pays exactly once:

- A bet event is replayed when its worker dies after COMMIT and before XACK (and by any job
  retry). Its commissions are accrued by the same atomic call that acknowledges its entry,
  and an entry stops being pending once: the replay's ack accrues them, the crashed one did
  not. Two consumers acknowledging the same entries: the second finds them acknowledged and
  adds nothing for them.
- RENAME takes the pending hash whole: an accrual after it starts a new pending hash, so
  nothing between the read and the delete is lost. Batch contents never change afterwards.
- The unit of payment is one taken hash, ``(batch_id, bucket)``, created atomically with its
  entry in ``cbatches``, so every flusher that finds it sees all of it. PostgreSQL inserts a
  unit once (primary key) and writes money only for units the statement itself inserted;
  ledger entry ids carry a fresh id per statement, so they never collide (a collision would
  abort the statement, never drop money silently).
- Redis is credited only after PostgreSQL holds the unit, once per (unit, ancestor) by
  marker, and the unit is dropped only after that. A crash at any point leaves the unit in
  ``cbatches`` and the next flush (any process) completes it; two flushes at once pay once.

Conservation: an ancestor's Redis balance and ``SUM(ledger.delta)`` agree once the flush has
credited; between the statement and the credit PostgreSQL is ahead by the unit in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgpack
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from games.codes import CREDIT_HEAL
from games.commission import accrued, check_bps
from games.types import UserId
from plumbing import heal, scripts
from plumbing.keys import Keys
from plumbing.lease import Lease
from plumbing.metrics import FLUSH_STATEMENTS, UNITS_PAID
from plumbing.scripts import Call
from workers import faults

log = structlog.get_logger(__name__)

#: Lifetime of the per-credit markers (``Keys.commission_credited``), seconds: far longer
#: than any flush that could still be finishing the unit it marks.
MARKER_TTL_S = 7 * 24 * 3600
#: An ancestor chain is read from PostgreSQL at most this often per player (bps changes
#: apply to bets settled up to this long after them).
CHAIN_TTL_S = 30.0
CHAIN_CACHE_SIZE = 100_000

Chain = tuple[tuple[UserId, int], ...]


@dataclass
class Stats:
    """Counters of this process (tests count statements per window with them)."""

    statements: int = 0
    flushes: int = 0
    accrued: int = 0


STATS = Stats()


# -- ancestor chains -------------------------------------------------------------------------

_CHAINS_SQL = """
WITH RECURSIVE up AS (
    SELECT u.user_id AS player, p.user_id, p.parent_id, p.commission_bps, 0 AS depth
    FROM users u JOIN users p ON p.user_id = u.parent_id
    WHERE u.user_id = ANY($1::bigint[])
    UNION ALL
    SELECT up.player, p.user_id, p.parent_id, p.commission_bps, up.depth + 1
    FROM up JOIN users p ON p.user_id = up.parent_id
    WHERE up.depth < 8
)
SELECT player, user_id, commission_bps FROM up ORDER BY player, depth
"""


async def fetch_chains(pool: asyncpg.Pool, user_ids: Sequence[int]) -> dict[int, Chain]:
    """``(ancestor, bps)`` nearest first for each user, in one query (as users.ancestors)."""
    chains: dict[int, list[tuple[UserId, int]]] = {uid: [] for uid in user_ids}
    for row in await pool.fetch(_CHAINS_SQL, list(user_ids)):
        chains[row["player"]].append((UserId(row["user_id"]), int(row["commission_bps"])))
    return {uid: tuple(chain) for uid, chain in chains.items()}


class ChainCache:
    """Players' chains, kept ``ttl_s`` and at most ``max_size`` of them (least recent out)."""

    def __init__(self, ttl_s: float = CHAIN_TTL_S, max_size: int = CHAIN_CACHE_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._max_size = max_size
        self._clock = clock
        self._data: OrderedDict[int, tuple[float, Chain]] = OrderedDict()

    def clear(self) -> None:
        self._data.clear()

    async def get_many(self, pool: asyncpg.Pool, user_ids: Iterable[int]) -> dict[int, Chain]:
        now = self._clock()
        out: dict[int, Chain] = {}
        missing: list[int] = []
        for uid in set(user_ids):
            hit = self._data.get(uid)
            if hit is not None and hit[0] > now:
                out[uid] = hit[1]
                self._data.move_to_end(uid)
            else:
                missing.append(uid)
        if missing:
            fetched = await fetch_chains(pool, missing)
            for uid in missing:
                out[uid] = fetched[uid]
                self._data[uid] = (now + self._ttl_s, fetched[uid])
                self._data.move_to_end(uid)
            while len(self._data) > self._max_size:
                self._data.popitem(last=False)
        return out


CHAINS = ChainCache()

#: ``(ancestor field, bps)`` of one (player, currency): the pending-hash field
#: ``"<ancestor>|<currency>"`` and the ancestor's rate, for every ancestor with bps > 0.
Shares = tuple[tuple[str, int], ...]


async def shares_of(pool: asyncpg.Pool, pairs: Iterable[tuple[int, str]], *,
                    chains: ChainCache | None = None) -> dict[tuple[int, str], Shares]:
    """For each (player, currency), what a bet accrues per ancestor: a stake ``amount``
    pays :func:`games.commission.commission` of it to each field (a zero share is not
    accrued; :func:`increments` sums them). Kept as long as the chain."""
    pairs = set(pairs)
    chain_of = await (chains or CHAINS).get_many(pool, {uid for uid, _ in pairs})
    out: dict[tuple[int, str], Shares] = {}
    for pair in pairs:
        chain = chain_of[pair[0]]
        hit = _SHARES.get(pair)
        if hit is not None and hit[0] is chain:
            out[pair] = hit[1]
            continue
        for _, bps in chain:
            check_bps(bps)
        shares = tuple((f"{ancestor}|{pair[1]}", bps) for ancestor, bps in chain if bps > 0)
        if len(_SHARES) >= 2 * CHAIN_CACHE_SIZE:
            _SHARES.clear()
        _SHARES[pair] = (chain, shares)
        out[pair] = shares
    return out


#: (player, currency) -> (the chain they were computed from, the shares): reused while the
#: chain cache returns that same chain object.
_SHARES: dict[tuple[int, str], tuple[Chain, Shares]] = {}


#: A persisted bet whose outbox ack accrues its commissions: (entry id, stake, shares). A
#: plain tuple: one is made per bet.
Accruing = tuple[bytes, int, Shares]


def increments(bets: Iterable[Accruing]) -> bytes:
    """What one bucket's acknowledged bets add to its pending hash, as
    lua/outbox-ack-accrue-n.lua takes it: a msgpack array ``[field, amount, ...]`` of
    strings (an amount past 2^53 would lose digits as a Lua number), ``b""`` for none."""
    flat: list[str] = []
    for name, amount in accrued((stake, shares) for _, stake, shares in bets).items():
        flat += (name, str(amount))
    return msgpack.packb(flat) if flat else b""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the flush, step by step -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unit:
    """One taken pending hash: what ``bucket`` accrued until the flush ``batch_id`` took it."""

    batch_id: str
    bucket: int
    amounts: Mapping[tuple[int, str], int]  # (ancestor, currency) -> minor units; {} = gone

    @property
    def name(self) -> str:
        return f"{self.batch_id}.{self.bucket}"


async def take(redis: aioredis.Redis, keys: Keys, batch_id: str) -> list[Unit]:
    """Take every bucket's pending hash as ``batch_id``; return every unfinished unit.

    The units are the ones just taken plus any earlier flush left unfinished (crashed, or
    running right now), with their contents.
    """
    calls: list[Call] = [
        (scripts.COMMISSION_TAKE,
         (keys.commission_pending(b), keys.commission_batch(b, batch_id),
          keys.commission_batches(b)), (batch_id,))
        for b in range(keys.buckets)
    ]
    found = [(b, _text(i)) for b, reply in enumerate(await scripts.run(redis, calls))
             for i in reply[1:]]
    if not found:
        return []
    pipe = redis.pipeline(transaction=False)
    for b, i in found:
        pipe.hgetall(keys.commission_batch(b, i))
    units: list[Unit] = []
    for (b, i), raw in zip(found, await pipe.execute(), strict=True):
        amounts: dict[tuple[int, str], int] = {}
        for k, v in raw.items():
            ancestor, _, currency = _text(k).partition("|")
            amounts[(int(ancestor), currency)] = int(v)
        units.append(Unit(i, b, amounts))
    return units


_WRITE_SQL = """
WITH units AS (
    INSERT INTO commission_batches (batch_id, bucket, write_id)
    SELECT u.batch_id, u.bucket, $3::text
    FROM unnest($1::text[], $2::integer[]) AS u(batch_id, bucket)
    ORDER BY u.batch_id, u.bucket
    ON CONFLICT DO NOTHING
    RETURNING batch_id, bucket
), paid AS (
    SELECT x.user_id, x.currency, sum(x.amount)::bigint AS amount
    FROM unnest($4::text[], $5::integer[], $6::bigint[], $7::text[], $8::bigint[])
         AS x(batch_id, bucket, user_id, currency, amount)
    JOIN units USING (batch_id, bucket)
    GROUP BY x.user_id, x.currency
), ledger_rows AS (
    INSERT INTO ledger (entry_id, user_id, currency, delta, kind)
    SELECT 'com:' || $3::text || ':' || user_id || ':' || currency, user_id, currency,
           amount, 'commission'
    FROM paid
), totals AS (
    INSERT INTO commission_totals AS t (user_id, currency, earned)
    SELECT user_id, currency, amount FROM paid ORDER BY user_id, currency
    ON CONFLICT (user_id, currency) DO UPDATE SET earned = t.earned + EXCLUDED.earned
)
SELECT (SELECT count(*) FROM units) AS batches,
       ARRAY(SELECT currency FROM paid GROUP BY currency ORDER BY currency) AS currencies,
       ARRAY(SELECT sum(amount)::bigint FROM paid GROUP BY currency ORDER BY currency)
           AS amounts
"""


@dataclass(frozen=True, slots=True)
class Written:
    statements: int  # 0 (nothing to write) or 1
    batches: int  # units this statement inserted (the others were paid before)
    paid: dict[str, int]  # currency -> minor units this statement paid


async def write(pool: asyncpg.Pool, units: Sequence[Unit]) -> Written:
    """Pay ``units`` in PostgreSQL: ONE statement (one round trip) for all of them.

    Idempotent per unit: a unit already in ``commission_batches`` pays nothing again.
    """
    live = sorted((u for u in units if u.amounts), key=lambda u: (u.batch_id, u.bucket))
    if not live:
        return Written(0, 0, {})
    cols: list[list[Any]] = [[], [], [], [], []]
    for u in live:
        for (ancestor, currency), amount in u.amounts.items():
            for col, value in zip(cols, (u.batch_id, u.bucket, ancestor, currency, amount),
                                  strict=True):
                col.append(value)
    write_id = uuid.uuid4().hex
    row = await pool.fetchrow(_WRITE_SQL, [u.batch_id for u in live], [u.bucket for u in live],
                              write_id, *cols)
    STATS.statements += 1
    assert row is not None
    return Written(1, int(row["batches"]),
                   dict(zip(row["currencies"], map(int, row["amounts"]), strict=True)))


class NotHealed(RuntimeError):
    """An ancestor's credit was refused (HEAL) and could not be healed here: the units stay
    unfinished, and the next flush credits them."""


async def credit(redis: aioredis.Redis, keys: Keys, units: Sequence[Unit],
                 marker_ttl_s: int = MARKER_TTL_S, pool: asyncpg.Pool | None = None) -> int:
    """Credit every ancestor of ``units`` (already paid in PostgreSQL) in Redis, once.

    One script call per ancestor, all in one pipeline. Returns how many ancestors were
    credited something now. An ancestor whose Redis state is not healed since Redis last
    restarted (the script answers HEAL) is healed first (:mod:`plumbing.heal`, with
    ``pool``) and credited again: the heal sets the markers of the units PostgreSQL paid,
    so what it counted is not credited twice.

    Raises:
        NotHealed: some ancestor still refused (or no ``pool`` to heal it with).
    """
    per_ancestor: dict[int, list[tuple[str, dict[str, int]]]] = {}
    for u in units:
        mine: dict[int, dict[str, int]] = {}
        for (ancestor, currency), amount in u.amounts.items():
            mine.setdefault(ancestor, {})[currency] = amount
        for ancestor, by_currency in mine.items():
            per_ancestor.setdefault(ancestor, []).append((u.name, by_currency))
    calls: list[Call] = []
    for ancestor, parts in sorted(per_ancestor.items()):
        currencies = sorted({c for _, by in parts for c in by})
        call_keys = [keys.balances(ancestor), keys.user_channel(ancestor),
                     keys.healed(ancestor)]
        args = [str(marker_ttl_s), str(len(currencies)), *currencies]
        for name, by in parts:
            call_keys.append(keys.commission_credited(ancestor, name))
            args += [str(by.get(c, 0)) for c in currencies]
        calls.append((scripts.COMMISSION_CREDIT, call_keys, args))
    ancestors = sorted(per_ancestor)
    replies = await scripts.run(redis, calls)
    refused = [i for i, r in enumerate(replies) if int(r) == CREDIT_HEAL]
    if refused and pool is not None:
        for i in refused:
            await heal.heal(redis, pool, keys, ancestors[i])
        for i, reply in zip(refused, await scripts.run(redis, [calls[i] for i in refused]),
                            strict=True):
            replies[i] = reply
        refused = [i for i in refused if int(replies[i]) == CREDIT_HEAL]
    if refused:
        raise NotHealed(f"ancestors {[ancestors[i] for i in refused]} are not healed")
    return sum(1 for r in replies if int(r) > 0)


async def drop(redis: aioredis.Redis, keys: Keys, units: Sequence[Unit]) -> None:
    """Forget finished units: the hash first, then its entry (a crash between leaves an
    entry whose hash is gone, which the next flush just removes)."""
    if not units:
        return
    pipe = redis.pipeline(transaction=False)
    for u in units:
        pipe.delete(keys.commission_batch(u.bucket, u.batch_id))
        pipe.srem(keys.commission_batches(u.bucket), u.batch_id)
    await pipe.execute()


async def _count(redis: aioredis.Redis, keys: Keys, written: Written) -> None:
    """Add one flush's statement and paid units to the shared counters (just after the
    statement committed). Telemetry only: a failure is logged, never raised."""
    try:
        pipe = redis.pipeline(transaction=False)
        pipe.hincrby(keys.worker_stats(), FLUSH_STATEMENTS, written.statements)
        pipe.hincrby(keys.worker_stats(), UNITS_PAID, written.batches)
        await pipe.execute()
    except (RedisError, OSError) as exc:
        log.warning("commission_stats_not_counted", error=repr(exc))


@dataclass(frozen=True, slots=True)
class FlushReport:
    batch_id: str
    batches: int  # units handled (taken now or left by earlier flushes)
    batches_paid: int  # units this flush's statement inserted in PostgreSQL
    ancestors_credited: int
    statements: int
    paid: dict[str, int] = field(default_factory=dict)  # currency -> minor units


async def flush(redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys,
                batch_id: str | None = None) -> FlushReport:
    """Take, write, credit, drop: pay everything accrued so far, exactly once.

    Lock-free and safe to run concurrently or to retry after a crash at any step (see the
    module docstring): a retry needs no id of its own, it finds what an earlier attempt left
    in the ``cbatches`` sets. ``batch_id`` is only a label (a job id, say): a fresh uuid4 is
    always appended, because an id PostgreSQL has paid must never name new money (the
    statement would skip it as paid).
    """
    batch_id = f"{batch_id}.{uuid.uuid4().hex}" if batch_id else uuid.uuid4().hex
    units = await take(redis, keys, batch_id)
    if units:
        faults.point("flush_after_take")  # crash tests (workers/faults.py)
    written = await write(pool, units)
    if written.statements:
        faults.point("flush_after_write")  # crash tests (workers/faults.py)
        await _count(redis, keys, written)
    credited = await credit(redis, keys, units, pool=pool)
    await drop(redis, keys, units)
    STATS.flushes += 1
    report = FlushReport(batch_id, len(units), written.batches, credited,
                         written.statements, written.paid)
    if units:
        log.info("commissions_flushed", batch_id=batch_id, batches=len(units),
                 paid_batches=written.batches, ancestors=credited, paid=written.paid)
    return report


# -- one flush per window, across processes --------------------------------------------------


async def flush_window(redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys,
                       window_s: float, token: str) -> FlushReport | None:
    """Flush if this process wins the current window's lease, else return None.

    The lease (SET NX PX ``window_s``) is kept until it expires: whoever takes it flushes
    once, and no flusher anywhere flushes again before the window ends (so PostgreSQL gets
    at most one commission statement per window). Released only when the flush fails, so
    another flusher may retry at once. Correctness never depends on the lease.
    """
    lease = Lease(redis, keys.commission_lease(), int(window_s * 1000), token)
    if not await lease.acquire():
        return None
    try:
        return await flush(redis, pool, keys)
    except Exception:
        with contextlib.suppress(Exception):
            await lease.release()
        raise


class Flusher:
    """The flush loop of one process: every ``interval_s``, if it holds the window's lease.

    Run by the in-process persister (workers/persister.py); the Dramatiq workers may call
    :func:`flush_window` or :func:`flush` instead. ``close()`` flushes once more, so the
    commissions of the last bets persisted are paid before the process ends.
    """

    def __init__(self, redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys,
                 interval_s: float, owner: str) -> None:
        self._redis = redis
        self._pool = pool
        self._keys = keys
        self._interval_s = interval_s
        self._token = f"{owner}:{uuid.uuid4().hex}"
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reports: list[FlushReport] = []

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="commission-flusher")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        await task
        try:
            await flush(self._redis, self._pool, self._keys)
        except Exception as exc:  # left in Redis: the next flusher anywhere pays it
            log.error("commission_final_flush_failed", error=repr(exc))

    async def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                report = await flush_window(self._redis, self._pool, self._keys,
                                            self._interval_s, self._token)
                if report is not None and report.batches:
                    self.reports = [*self.reports[-99:], report]
                left = int(await self._redis.pttl(self._keys.commission_lease()))
                # -2: no lease (released after a failure): try again now; -1: no expiry.
                delay = left / 1000 if left > 0 else 0.0 if left == -2 else self._interval_s
                failures = 0
            except Exception as exc:
                failures += 1
                delay = min(5.0, 0.1 * 2 ** (failures - 1))
                log.error("commission_flush_error", error=repr(exc), failures=failures,
                          retry_in_s=delay, exc_info=failures == 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.005, delay))
