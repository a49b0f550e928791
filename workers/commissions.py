"""Commissions up the agent chain: recorded with each bet, paid by PostgreSQL per window.

PROTOCOL.md, "Commissions": every settled bet pays each ancestor of the player
``floor(amount * bps / 10000)`` (:mod:`games.commission` states the rule), exactly once,
whatever crashes, retries or Redis rollbacks happen. PostgreSQL is the record of what is
paid; Redis only mirrors it in the ancestors' live balances. The path of one bet's
commissions::

    outbox batch (workers/outbox.py): the bet row is inserted with the chain that applies
      to its player now, commission_to = ancestors (nearest first), commission_bps = their
      rates (bps > 0 only; none: NULL, the bet owes nothing); only the insert that creates
      the row writes them (ON CONFLICT DO NOTHING), so a replay changes nothing
    -> flush() every window (one flusher holds the window's lease):
       pay     ONE PostgreSQL statement (its own transaction): every bet with a chain and no
               commission_flush gets commission_flush = <flush_id> (partial index
               bets_commission_due; FOR UPDATE SKIP LOCKED); their shares, floored per bet
               and ancestor and summed per (ancestor, currency), become the ledger rows
               com:<flush_id>:<ancestor>:<currency>, commission_totals, and the flush's
               credit plan in commission_flushes; it also records as credited the flushes
               Redis confirmed since the last statement, and lists the ones still not
       credit  commission-credit-n.lua per ancestor on its bucket: for this flush's plan and
               every plan still not credited, marker Keys.credit_marker(flush, ancestor)
               SET NX + HINCRBY balance + PUBLISH the push, one atomic call
       confirm SADD the plans' ids to Keys.commission_confirmed(): the next statement, by
               whichever process, sets their credited_at

Why each (bet, ancestor) is paid exactly once:

- A bet is paid by the statement that sets its commission_flush, in the same transaction as
  the ledger rows and totals; a statement only takes bets whose commission_flush is NULL
  (re-checked under the row lock), so a repeated flush, two flushers at once, a crash
  before or after the commit, pay each bet once or not yet, never twice. Nothing in Redis
  takes part: a Redis that forgets (a rollback, a failover) cannot make PostgreSQL pay again.
- The rates are the bet's own (commission_to, commission_bps), written once with the row: a
  replayed outbox entry finds the row and writes nothing, and a later change of rates
  applies to later bets only. The audit recomputes every payment from them (ops/audit.py).
- Redis credits a plan once per (flush, ancestor) by marker, set in the same call as the
  increment: after a crash between the commit and the credit the plan is still uncredited
  in PostgreSQL and the next flush (any process) credits it; credited twice, the marker
  stops the second. A Redis that rolls back loses a credit and its marker together; while
  the plan is not yet recorded as credited, the next flush makes it again. Once it is
  recorded, each flush checks that Redis still holds the markers of the last flushes
  recorded (:data:`NEWEST`); one missing means Redis went back past it, and the flush
  credits again every plan recorded in the last :data:`RECHECK_S`, by marker, so what
  Redis kept is not added twice. A heal that sets balances from the ledger sets the
  markers of the credits the ledger holds, so the two never add the same credit.

Conservation: an ancestor's Redis balance and ``SUM(ledger.delta)`` agree once the flush has
credited; between the statement and the credit PostgreSQL is ahead by the plan in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg
import structlog
from redis.exceptions import RedisError

from games.codes import CREDIT_HEAL
from games.commission import check_bps
from games.types import UserId
from plumbing import heal, scripts
from plumbing.keys import COMMISSION_RECHECK_S, CREDIT_MARKER_TTL_S, Keys
from plumbing.lease import Lease
from plumbing.metrics import FLUSH_STATEMENTS, UNITS_PAID
from plumbing.redisclient import Client
from plumbing.scripts import Call
from workers import faults

log = structlog.get_logger(__name__)

#: An ancestor chain is read from PostgreSQL at most this often per player (bps changes
#: apply to bets persisted up to this long after them).
CHAIN_TTL_S = 30.0
CHAIN_CACHE_SIZE = 100_000
#: Bets one statement pays at most: a backlog (workers down for a while) is paid over
#: several windows instead of in one statement that holds its locks for long.
FLUSH_LIMIT = 200_000
#: A plan left uncredited this long is no longer credited by the workers: its markers
#: (which live CREDIT_MARKER_TTL_S) could be gone, and a credit made again would double it.
#: The audit reports it; the heal (balances from the ledger) settles it.
CREDIT_HORIZON_S = CREDIT_MARKER_TTL_S - 24 * 3600
#: How many of the flushes last recorded as credited each flush checks in Redis (their
#: markers): a marker missing means Redis rolled back past that credit.
NEWEST = 3
#: How far back a flush then credits again what PostgreSQL recorded as credited (by
#: marker: what Redis kept is not added twice). A rollback further back than this is a
#: disaster for the heal or ``make rebuild-balances``.
RECHECK_S = COMMISSION_RECHECK_S

Chain = tuple[tuple[UserId, int], ...]


@dataclass
class Stats:
    """Counters of this process (tests count statements per window with them)."""

    statements: int = 0
    flushes: int = 0


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


#: One cache per database (per pool): user ids of two databases are unrelated. The pool is
#: held, so its id is never reused by another while its cache lives; a process has one or
#: two pools (tests open more, hence the bound).
_CACHES: OrderedDict[int, tuple[asyncpg.Pool, ChainCache]] = OrderedDict()


def chains_for(pool: asyncpg.Pool) -> ChainCache:
    """The chain cache of ``pool``'s database."""
    hit = _CACHES.get(id(pool))
    if hit is None:
        hit = _CACHES[id(pool)] = (pool, ChainCache())
        while len(_CACHES) > 8:
            _CACHES.popitem(last=False)
    return hit[1]


def clear_chains() -> None:
    """Forget every cached chain (a rate change that must apply at once, a benchmark)."""
    _CACHES.clear()

#: The chains of a batch's players as the persist statement takes them (workers/outbox.py):
#: four columns, one row per (player, ancestor with bps > 0): player, ancestor, bps, and
#: the ancestor's place in the chain (0 nearest).
ChainColumns = tuple[list[int], list[int], list[int], list[int]]


async def chain_columns(pool: asyncpg.Pool, players: Iterable[int], *,
                        chains: ChainCache | None = None) -> ChainColumns:
    """What the bets of ``players`` record as their commission chain (see the module
    docstring): the cached chains, every rate checked, the ancestors earning 0 left out."""
    chain_of = await (chains or chains_for(pool)).get_many(pool, players)
    cols: ChainColumns = ([], [], [], [])
    for player, chain in chain_of.items():
        place = 0
        for ancestor, bps in chain:
            if check_bps(bps):
                cols[0].append(player)
                cols[1].append(ancestor)
                cols[2].append(bps)
                cols[3].append(place)
                place += 1
    return cols


# -- the flush, step by step -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What one flush paid, as Redis must credit it: (ancestor, currency) -> minor units."""

    flush_id: str
    amounts: Mapping[tuple[int, str], int]


# Shares are floor(amount * bps / 10000) per bet and ancestor, computed without overflow
# in bigint: amount = q * 10000 + r gives q * bps + floor(r * bps / 10000), exactly.
_PAY_SQL = """
WITH confirmed AS (
    UPDATE commission_flushes SET credited_at = now()
    WHERE flush_id = ANY($2::text[]) AND credited_at IS NULL
), due AS (
    SELECT bet_id FROM bets
    WHERE commission_flush IS NULL AND commission_to IS NOT NULL
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), paid AS (
    UPDATE bets AS b SET commission_flush = $1
    FROM due
    WHERE b.bet_id = due.bet_id AND b.commission_flush IS NULL
    RETURNING b.currency, b.amount, b.commission_to, b.commission_bps
), shares AS (
    SELECT s.user_id, p.currency,
           sum((p.amount / 10000) * s.bps + (p.amount % 10000) * s.bps / 10000)::bigint
               AS amount
    FROM paid AS p
    CROSS JOIN LATERAL unnest(p.commission_to, p.commission_bps) AS s(user_id, bps)
    GROUP BY s.user_id, p.currency
    HAVING sum((p.amount / 10000) * s.bps + (p.amount % 10000) * s.bps / 10000) > 0
), plan AS (
    INSERT INTO commission_flushes (flush_id, user_ids, currencies, amounts)
    SELECT $1, array_agg(user_id ORDER BY user_id, currency),
           array_agg(currency ORDER BY user_id, currency),
           array_agg(amount ORDER BY user_id, currency)
    FROM shares
    HAVING count(*) > 0
    RETURNING user_ids, currencies, amounts
), ledger_rows AS (
    INSERT INTO ledger (entry_id, user_id, currency, delta, kind)
    SELECT 'com:' || $1 || ':' || user_id || ':' || currency, user_id, currency, amount,
           'commission'
    FROM shares
), totals AS (
    INSERT INTO commission_totals AS t (user_id, currency, earned)
    SELECT user_id, currency, amount FROM shares ORDER BY user_id, currency
    ON CONFLICT (user_id, currency) DO UPDATE SET earned = t.earned + EXCLUDED.earned
)
SELECT (SELECT count(*) FROM paid) AS bets,
       (SELECT user_ids FROM plan) AS user_ids,
       (SELECT currencies FROM plan) AS currencies,
       (SELECT amounts FROM plan) AS amounts,
       ARRAY(SELECT flush_id FROM commission_flushes
             WHERE credited_at IS NULL AND flush_id <> ALL($2::text[])
               AND created_at > now() - make_interval(secs => $4)
             ORDER BY created_at, flush_id) AS older,
       ARRAY(SELECT flush_id || ':' || user_ids[1] FROM commission_flushes
             WHERE credited_at IS NOT NULL
             ORDER BY credited_at DESC, flush_id DESC LIMIT $5) AS newest
"""

_RECENT_SQL = """
SELECT flush_id, user_ids, currencies, amounts FROM commission_flushes
WHERE credited_at > now() - make_interval(secs => $1)
ORDER BY created_at, flush_id
"""

_PLANS_SQL = """
SELECT flush_id, user_ids, currencies, amounts FROM commission_flushes
WHERE flush_id = ANY($1::text[]) AND credited_at IS NULL
ORDER BY created_at, flush_id
"""


def _plan(flush_id: str, user_ids: Sequence[int], currencies: Sequence[str],
          amounts: Sequence[int]) -> Plan:
    return Plan(flush_id, {(int(u), c): int(a)
                           for u, c, a in zip(user_ids, currencies, amounts, strict=True)})


@dataclass(frozen=True, slots=True)
class Paid:
    """What one pay statement did."""

    bets: int  # bets it marked paid
    plan: Plan | None  # its credit plan (None: nothing to credit, no flush row)
    older: tuple[str, ...]  # earlier flushes PostgreSQL still holds as not credited
    #: the flushes last recorded as credited, each with one ancestor: (flush id, ancestor)
    newest: tuple[tuple[str, int], ...] = ()


async def pay(pool: asyncpg.Pool, flush_id: str, confirmed: Sequence[str] = (),
              limit: int = FLUSH_LIMIT, horizon_s: float = CREDIT_HORIZON_S) -> Paid:
    """ONE statement, its own transaction: pay every due bet (up to ``limit``) as
    ``flush_id``, record ``confirmed`` as credited, list the other uncredited flushes of the
    last ``horizon_s``. ``flush_id`` must be new (the caller makes it with a uuid4)."""
    row = await pool.fetchrow(_PAY_SQL, flush_id, list(confirmed), limit, float(horizon_s),
                              NEWEST)
    assert row is not None
    STATS.statements += 1
    plan = None if row["user_ids"] is None else _plan(
        flush_id, row["user_ids"], row["currencies"], row["amounts"])
    newest = tuple((f, int(a)) for f, _, a in (n.rpartition(":") for n in row["newest"]))
    return Paid(int(row["bets"]), plan, tuple(row["older"]), newest)


async def plans(pool: asyncpg.Pool, flush_ids: Sequence[str]) -> list[Plan]:
    """The credit plans of these flushes that are still not recorded as credited."""
    if not flush_ids:
        return []
    return [_plan(r["flush_id"], r["user_ids"], r["currencies"], r["amounts"])
            for r in await pool.fetch(_PLANS_SQL, list(flush_ids))]


async def lost_plans(redis: Client, pool: asyncpg.Pool, keys: Keys, paid: Paid,
                     recheck_s: float = RECHECK_S) -> list[Plan]:
    """After a Redis rollback: the plans of every flush recorded as credited in the last
    ``recheck_s``, when Redis has lost the marker of one of the last recorded (so it lost
    their credits: a marker and its credit go together); else none. Crediting them again
    is by marker, so the ones Redis still holds are not credited twice."""
    if not paid.newest:
        return []
    pipe = redis.pipeline(transaction=False)
    for flush_id, ancestor in paid.newest:
        pipe.exists(keys.credit_marker(flush_id, ancestor))
    if all(await pipe.execute()):
        return []
    found = [_plan(r["flush_id"], r["user_ids"], r["currencies"], r["amounts"])
             for r in await pool.fetch(_RECENT_SQL, float(recheck_s))]
    log.warning("commission_credits_lost_in_redis", flushes=len(found))
    return found


class NotHealed(RuntimeError):
    """An ancestor's credit was refused (HEAL) and could not be healed here: its plans stay
    unrecorded as credited, and the next flush credits them again."""


async def credit(redis: Client, keys: Keys, plans: Sequence[Plan],
                 marker_ttl_s: int = CREDIT_MARKER_TTL_S,
                 pool: asyncpg.Pool | None = None) -> int:
    """Credit every ancestor of ``plans`` (paid in PostgreSQL) in Redis, once per
    (flush, ancestor): one script call per ancestor, all in one pipeline. Returns how many
    ancestors were credited something now.

    An ancestor whose Redis state is not healed since Redis last restarted (the script
    answers HEAL) is healed first (:mod:`plumbing.heal`, with ``pool``) and credited again:
    the heal sets the markers of the credits PostgreSQL paid, so what it counted is not
    credited twice.

    Raises:
        NotHealed: some ancestor still refused (or no ``pool`` to heal it with).
    """
    per_ancestor: dict[int, list[tuple[str, dict[str, int]]]] = {}
    for plan in plans:
        mine: dict[int, dict[str, int]] = {}
        for (ancestor, currency), amount in plan.amounts.items():
            mine.setdefault(ancestor, {})[currency] = amount
        for ancestor, by_currency in mine.items():
            per_ancestor.setdefault(ancestor, []).append((plan.flush_id, by_currency))
    calls: list[Call] = []
    for ancestor, parts in sorted(per_ancestor.items()):
        currencies = sorted({c for _, by in parts for c in by})
        call_keys = [keys.balances(ancestor), keys.user_channel(ancestor),
                     keys.healed(ancestor)]
        args = [str(marker_ttl_s), str(len(currencies)), *currencies]
        for flush_id, by in parts:
            call_keys.append(keys.credit_marker(flush_id, ancestor))
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


async def confirm(redis: Client, keys: Keys, flush_ids: Sequence[str]) -> None:
    """Tell the next statement (any process) that Redis took these plans."""
    if flush_ids:
        await redis.sadd(keys.commission_confirmed(), *flush_ids)


async def confirmed(redis: Client, keys: Keys, count: int = 10_000) -> list[str]:
    """Take the flush ids Redis confirmed, for the next statement to record. Taken ids the
    statement then fails to record stay uncredited in PostgreSQL: the next flush credits
    them again (the markers make it a no-op) and confirms them again."""
    raw: list[bytes] | None = await redis.spop(  # type: ignore[assignment]
        keys.commission_confirmed(), count)
    return sorted(_text(i) for i in raw or ())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _count(redis: Client, keys: Keys, paid: Paid) -> None:
    """Add one flush's statement and the bets it paid to the shared counters (just after
    the statement committed). Telemetry only: a failure is logged, never raised."""
    try:
        pipe = redis.pipeline(transaction=False)
        pipe.hincrby(keys.worker_stats(), FLUSH_STATEMENTS, 1)
        pipe.hincrby(keys.worker_stats(), UNITS_PAID, paid.bets)
        await pipe.execute()
    except (RedisError, OSError) as exc:
        log.warning("commission_stats_not_counted", error=repr(exc))


@dataclass(frozen=True, slots=True)
class FlushReport:
    flush_id: str
    bets: int  # bets this flush's statement paid
    plans: int  # plans credited (this flush's and earlier uncredited ones)
    ancestors_credited: int
    statements: int
    paid: dict[str, int] = field(default_factory=dict)  # currency -> minor units paid now


async def flush(redis: Client, pool: asyncpg.Pool, keys: Keys,
                label: str | None = None, *, limit: int = FLUSH_LIMIT,
                marker_ttl_s: int = CREDIT_MARKER_TTL_S) -> FlushReport:
    """Pay, credit, confirm: pay everything due so far, exactly once.

    Lock-free and safe to run concurrently or to retry after a crash at any step (see the
    module docstring). ``label`` only names the flush (a job id, say): a fresh uuid4 is
    always added, because a flush id names the money of one statement only.
    """
    flush_id = f"{label}.{uuid.uuid4().hex}" if label else uuid.uuid4().hex
    done = await confirmed(redis, keys)
    faults.point("flush_before_commit")  # crash tests (workers/faults.py)
    paid = await pay(pool, flush_id, done, limit)
    if paid.bets:
        await _count(redis, keys, paid)
    todo = [paid.plan] if paid.plan is not None else []
    if todo:
        faults.point("flush_after_commit")
    if paid.older:
        earlier = await plans(pool, paid.older)
        log.warning("commission_plans_recredited", flushes=[p.flush_id for p in earlier])
        todo += earlier
    todo += await lost_plans(redis, pool, keys, paid)
    credited = await credit(redis, keys, todo, marker_ttl_s, pool=pool)
    if todo:
        faults.point("flush_after_credit")
    await confirm(redis, keys, [p.flush_id for p in todo])
    STATS.flushes += 1
    totals: dict[str, int] = {}
    for (_, currency), amount in (paid.plan.amounts.items() if paid.plan else ()):
        totals[currency] = totals.get(currency, 0) + amount
    if todo:
        log.info("commissions_flushed", flush_id=flush_id, bets=paid.bets, plans=len(todo),
                 ancestors=credited, paid=totals)
    return FlushReport(flush_id, paid.bets, len(todo), credited, 1, totals)


# -- one flush per window, across processes --------------------------------------------------


async def flush_window(redis: Client, pool: asyncpg.Pool, keys: Keys,
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

    def __init__(self, redis: Client, pool: asyncpg.Pool, keys: Keys,
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
        except Exception as exc:  # still due in PostgreSQL: the next flusher anywhere pays it
            log.error("commission_final_flush_failed", error=repr(exc))

    async def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                report = await flush_window(self._redis, self._pool, self._keys,
                                            self._interval_s, self._token)
                if report is not None and (report.bets or report.plans):
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
