"""The audit: every persisted bet, every balance, and the conservation of money.

``python -m ops.audit`` (``make audit``) reads ``REDIS_URL`` and ``DATABASE_URL`` through
:class:`plumbing.settings.Settings` and works whether or not the servers and workers run. It
prints a summary and exits 0 only when every check holds, else 1 with the list of failures.

The checks
==========

(a) **Bets.** Every row of ``bets`` is recomputed from its seed pair (``seed_pairs.server_seed``
is stored server-side from the start, revealed or not) and its nonce: roll, win, multiplier
(:func:`games.dice.multiplier_bp` of the winning outcomes at the configured house edge),
payout. The bet must carry its pair's ``server_seed_hash``, client seed and user, and have
its ledger row ``bet:<bet_id>`` with ``delta = payout - amount``. Within a pair no nonce
appears twice, and a revealed pair has no bet past its ``final_nonce``. Every pair's
``server_seed_hash`` is ``SHA256(server_seed)``. Bets are streamed through a server-side
cursor ordered by ``(pair_id, nonce)``, so memory stays flat and duplicates are neighbours.

(b) **Balances.** For every user, ``SUM(delta)`` of the ledger per currency plus the events
still waiting in the outbox streams (``bet``: ``payout - amount``, ``deposit``: ``amount``;
an entry already committed but not yet acknowledged counts once) must equal the Redis hash
``keys.balances(user)``. Commissions of stored bets no flush has paid yet are in nobody's
balance: reported, not added. A flush PostgreSQL paid whose credit to an ancestor is still
to come (no ``Keys.credit_marker``) puts the ledger ahead of that ancestor by its share:
subtracted, and reported.

(b') **Commissions**, recomputed from the stored bets, not from what the flushes say: for
every flush, ancestor and currency, the sum over the bets that flush marked paid of
``floor(amount * bps / 10000)`` at each bet's own recorded rates must equal that flush's
ledger row ``com:<flush>:<ancestor>:<currency>``; every commission row of the ledger must
be so explained; ``commission_totals`` must equal the ledger's commission rows; no flush
may stay uncredited past the workers' horizon (its credit then needs the heal).

(c) **Conservation**, per currency, to the minor unit::

    deposits = balances + house result,  house result = stakes - payouts - commissions

where the ancestors' balances hold the commissions (``balances`` is every user's; the
player-side money is ``balances - commissions``). It is checked twice: from PostgreSQL alone
(balances = ledger sums), and from Redis (balances = the hashes, deposits, stakes and payouts
including the pending outbox). With ``--users`` the same identity holds for that set of
users, ``commissions`` then being what they received.

(d) **Told but not held.** Bets a player was shown that neither store holds, where that can
be known: a seed pair whose nonces 1 .. n (n its revealed final nonce, or the highest
nonce stored or waiting in the outbox) are not all in ``bets`` or the outbox. Possible only
when Redis lost acknowledged writes that never reached PostgreSQL (``appendfsync everysec``
on a machine crash, a failover to a lagging replica); each such pair is a failure, and the
summary counts the bets.

``REDIS_URL`` may name one Redis or any node of a Redis Cluster: the balance hashes are
found by SCAN on every master, and whether a user awaits its heal is judged against the run
id of the master holding its keys (each shard restarts, and may roll back, on its own).

A live system moves between reads of Redis and PostgreSQL, so failures of (b), (c) and (d) are
re-checked ``--retries`` times a second apart; only what persists is reported. (a) reads one
PostgreSQL snapshot of immutable rows and needs no retry.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from games import dice, seeds
from games.errors import InvalidTarget
from games.types import Hundredths, Minor
from plumbing import events, heal
from plumbing.keys import Keys
from plumbing.redisclient import Client, open_client, scan_keys
from plumbing.settings import Settings
from workers import commissions

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

#: Rows fetched per round trip from the server-side cursors, Redis keys per pipeline.
CHUNK = 5000

Money = dict[str, int]  # currency -> minor units
if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """One check that does not hold: which check, about what, and how."""

    check: str  # "bets", "pairs", "balances", "conservation", "commissions", "outbox"
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.subject}: {self.detail}"


@dataclass(slots=True)
class BetStats:
    bets: int = 0
    pairs: int = 0
    failures: list[Failure] = field(default_factory=list)


@dataclass(slots=True)
class Totals:
    """One currency's money, on one side (PostgreSQL, or Redis plus pending)."""

    deposits: int = 0
    balances: int = 0
    commissions: int = 0
    stakes: int = 0
    payouts: int = 0

    @property
    def house(self) -> int:
        """Stakes - payouts - commissions: what the house kept."""
        return self.stakes - self.payouts - self.commissions

    @property
    def gap(self) -> int:
        """``deposits - (balances + house)``: zero when money is conserved."""
        return self.deposits - (self.balances + self.house)


@dataclass(slots=True)
class Pending:
    """Events settled in Redis and not yet in PostgreSQL, and unflushed commissions."""

    events: int = 0
    bets: int = 0
    deposits: int = 0
    reveals: int = 0
    persisted: int = 0  # committed already, waiting for their XACK/XDEL: not pending
    deltas: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    stakes: Money = field(default_factory=lambda: defaultdict(int))
    payouts: Money = field(default_factory=lambda: defaultdict(int))
    deposited: Money = field(default_factory=lambda: defaultdict(int))
    commissions: Money = field(default_factory=lambda: defaultdict(int))
    due_bets: int = 0  # stored bets whose commissions no flush has paid yet
    #: (ancestor, currency) -> paid in PostgreSQL, not yet credited in Redis
    uncredited: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    dead: int = 0
    failures: list[Failure] = field(default_factory=list)


@dataclass(slots=True)
class MoneyReport:
    users: int = 0
    pg: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    redis: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    pending: Pending = field(default_factory=Pending)
    failures: list[Failure] = field(default_factory=list)
    #: (d): bets told to a player that neither store holds (nonces missing below the top).
    told_not_held: int = 0
    #: Users whose heal marker is stale (Redis restarted and nothing has touched them since):
    #: their hash is not their balance (every script refuses it until they are healed, from
    #: the ledger and the outbox), so their balance is counted as what the heal will set.
    awaiting_heal: int = 0


# -- (a) pure checks of one pair and one bet -------------------------------------------------


@dataclass(frozen=True, slots=True)
class PairRow:
    pair_id: int
    user_id: int
    server_seed: str
    server_seed_hash: str
    client_seed: str
    final_nonce: int | None = None


@dataclass(frozen=True, slots=True)
class StoredBet(events.SettledBet):
    """A row of ``bets`` as the audit reads it, with its ledger row (the outbox event it was
    written from is :class:`plumbing.events.BetEvent`)."""

    #: The bet's ledger row ``bet:<bet_id>`` (None when missing).
    ledger_user: int | None = None
    ledger_currency: str | None = None
    ledger_delta: int | None = None


def check_pair(pair: PairRow) -> list[Failure]:
    """The commitment holds: ``server_seed_hash == SHA256(server_seed)``."""
    if seeds.server_seed_hash(pair.server_seed) != pair.server_seed_hash:
        return [Failure("pairs", f"pair {pair.pair_id}",
                        "server_seed_hash is not SHA256(server_seed)")]
    return []


def check_bet(bet: StoredBet, pair: PairRow | None, house_edge_bp: int) -> list[Failure]:
    """Recompute one bet from its pair and nonce; every difference is a failure."""
    subject = f"bet {bet.bet_id} (user {bet.user_id})"
    out: list[Failure] = []

    def fail(detail: str) -> None:
        out.append(Failure("bets", subject, detail))

    if pair is None:
        fail(f"seed pair {bet.pair_id} does not exist")
        return out
    if pair.user_id != bet.user_id:
        fail(f"seed pair {pair.pair_id} belongs to user {pair.user_id}")
    if bet.server_seed_hash != pair.server_seed_hash:
        fail("server_seed_hash differs from its seed pair's")
    if bet.client_seed != pair.client_seed:
        fail("client_seed differs from its seed pair's")
    if bet.nonce < 1:
        fail(f"nonce {bet.nonce} < 1")
        return out
    if pair.final_nonce is not None and bet.nonce > pair.final_nonce:
        fail(f"nonce {bet.nonce} is past the revealed pair's final nonce {pair.final_nonce}")
    roll = dice.roll(pair.server_seed, pair.client_seed, bet.nonce)
    if roll != bet.roll:
        fail(f"roll {bet.roll} stored, {roll} recomputed")
    if bet.direction not in ("under", "over"):
        fail(f"direction {bet.direction!r}")
        return out
    direction: Any = bet.direction
    try:
        winning = dice.winning_outcomes(Hundredths(bet.target), direction)
    except InvalidTarget:
        fail(f"target {bet.target} {bet.direction} is not a valid bet")
        return out
    multiplier = dice.multiplier_bp(winning, house_edge_bp)
    if multiplier != bet.multiplier:
        fail(f"multiplier {bet.multiplier} stored, {multiplier} recomputed")
    win = dice.is_win(roll, Hundredths(bet.target), direction)
    payout = dice.payout(Minor(bet.amount), multiplier) if win else 0
    if payout != bet.payout:
        fail(f"payout {bet.payout} stored, {payout} recomputed ({'win' if win else 'loss'})")
    if bet.ledger_delta is None:
        fail("no ledger row")
    elif (bet.ledger_user, bet.ledger_currency, bet.ledger_delta) != (
        bet.user_id, bet.currency, bet.payout - bet.amount
    ):
        fail(f"ledger row says user {bet.ledger_user} {bet.ledger_currency} "
             f"{bet.ledger_delta:+d}, the bet {bet.payout - bet.amount:+d}")
    return out


@dataclass(slots=True)
class NonceTracker:
    """Spots a repeated (pair, nonce) in a stream of bets ordered by (pair_id, nonce)."""

    last: tuple[int, int] | None = None
    last_bet: str = ""

    def feed(self, bet: StoredBet) -> Failure | None:
        key = (bet.pair_id, bet.nonce)
        previous, previous_bet = self.last, self.last_bet
        self.last, self.last_bet = key, bet.bet_id
        if key == previous:
            return Failure("bets", f"pair {bet.pair_id} nonce {bet.nonce}",
                           f"used by two bets: {previous_bet} and {bet.bet_id}")
        return None


# -- (b) and (c): pure comparisons -----------------------------------------------------------


def due_balances(
    user_id: int, ledger: Mapping[str, int], pending: Mapping[tuple[int, str], int],
    uncredited: Mapping[tuple[int, str], int] | None = None,
) -> dict[str, int]:
    """What Redis must hold for the user: ledger + pending - uncredited, per currency."""
    uncredited = uncredited or {}
    names = set(ledger) | {c for u, c in [*pending, *uncredited] if u == user_id}
    return {c: ledger.get(c, 0) + pending.get((user_id, c), 0) - uncredited.get((user_id, c), 0)
            for c in names}


def compare_balances(
    user_id: int, ledger: Mapping[str, int], redis: Mapping[str, int],
    pending: Mapping[tuple[int, str], int],
    uncredited: Mapping[tuple[int, str], int] | None = None,
) -> list[Failure]:
    """Redis must hold ledger + pending outbox deltas - commissions paid in PostgreSQL but
    not credited yet, per currency (absent = 0)."""
    out: list[Failure] = []
    uncredited = uncredited or {}
    names = set(ledger) | set(redis) | {c for u, c in [*pending, *uncredited] if u == user_id}
    for currency in sorted(names):
        extra = pending.get((user_id, currency), 0)
        behind = uncredited.get((user_id, currency), 0)
        due = ledger.get(currency, 0) + extra - behind
        have = redis.get(currency, 0)
        if have < 0:
            out.append(Failure("balances", f"user {user_id} {currency}",
                               f"negative balance {have} in Redis"))
        if have != due:
            why = f" (ledger {ledger.get(currency, 0)} + pending {extra}" if extra else ""
            if behind:
                why = (why or f" (ledger {ledger.get(currency, 0)}") + f" - uncredited {behind}"
            why += ")" if why else ""
            out.append(Failure("balances", f"user {user_id} {currency}",
                               f"Redis {have}, ledger says {due}{why}: off by {have - due:+d}"))
    return out


def check_conservation(side: str, totals: Mapping[str, Totals]) -> list[Failure]:
    """``deposits = balances + (stakes - payouts - commissions)`` per currency."""
    return [
        Failure("conservation", f"{currency} ({side})",
                f"deposits {t.deposits} != balances {t.balances} + house {t.house} "
                f"(stakes {t.stakes} - payouts {t.payouts} - commissions {t.commissions}): "
                f"{t.gap:+d} unaccounted")
        for currency, t in sorted(totals.items()) if t.gap != 0
    ]


def add_event(pending: Pending, event: events.Event) -> None:
    """Count one not-yet-persisted outbox event."""
    pending.events += 1
    if isinstance(event, events.BetEvent):
        pending.bets += 1
        pending.deltas[(event.user_id, event.currency)] += event.payout - event.amount
        pending.stakes[event.currency] += event.amount
        pending.payouts[event.currency] += event.payout
    elif isinstance(event, events.DepositEvent):
        pending.deposits += 1
        pending.deltas[(event.user_id, event.currency)] += event.amount
        pending.deposited[event.currency] += event.amount
    else:
        pending.reveals += 1


def ledger_id(event: events.Event) -> str | None:
    """The ledger entry an event becomes (None for a reveal)."""
    if isinstance(event, events.BetEvent):
        return f"bet:{event.bet_id}"
    if isinstance(event, events.DepositEvent):
        return f"dep:{event.key}"
    return None


def event_user(event: events.Event) -> int | None:
    return None if isinstance(event, events.RevealEvent) else event.user_id


# -- I/O: PostgreSQL ---------------------------------------------------------------------------

_USER_FILTER = " WHERE {col} = ANY($1::bigint[])"

_BETS_SQL = """
SELECT b.bet_id, b.user_id, b.pair_id, b.currency, b.amount, b.payout, b.roll, b.target,
       b.direction, b.nonce, b.multiplier, b.server_seed_hash, b.client_seed,
       s.user_id AS s_user, s.server_seed AS s_seed, s.server_seed_hash AS s_hash,
       s.client_seed AS s_client, s.final_nonce AS s_final,
       l.user_id AS l_user, l.currency AS l_currency, l.delta AS l_delta
FROM bets b
LEFT JOIN seed_pairs s ON s.pair_id = b.pair_id
LEFT JOIN ledger l ON l.entry_id = 'bet:' || b.bet_id
{where}
ORDER BY b.pair_id, b.nonce, b.bet_id
"""


def _where(col: str, users: Sequence[int] | None) -> tuple[str, tuple[Any, ...]]:
    return (_USER_FILTER.format(col=col), (list(users),)) if users is not None else ("", ())


async def _rows(
    conn: Conn, sql: str, args: Sequence[Any], chunk: int
) -> AsyncIterator[asyncpg.Record]:
    """Stream a query through a server-side cursor (the caller holds a transaction)."""
    async for row in conn.cursor(sql, *args, prefetch=chunk):
        yield row


async def audit_bets(
    conn: Conn, house_edge_bp: int, users: Sequence[int] | None = None,
    chunk: int = CHUNK,
) -> BetStats:
    """Check (a) over every persisted bet and seed pair, in one read-only snapshot."""
    stats = BetStats()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        where, args = _where("user_id", users)
        async for r in _rows(
            conn, "SELECT pair_id, user_id, server_seed, server_seed_hash, client_seed,"
            f" final_nonce FROM seed_pairs{where}", args, chunk,
        ):
            stats.pairs += 1
            stats.failures += check_pair(PairRow(*r))
        where, args = _where("b.user_id", users)
        nonces = NonceTracker()
        async for r in _rows(conn, _BETS_SQL.format(where=where), args, chunk):
            stats.bets += 1
            bet = StoredBet(
                bet_id=r["bet_id"], user_id=r["user_id"], pair_id=r["pair_id"],
                currency=r["currency"], amount=r["amount"], payout=r["payout"],
                roll=r["roll"], target=r["target"], direction=r["direction"],
                nonce=r["nonce"], multiplier=r["multiplier"],
                server_seed_hash=r["server_seed_hash"], client_seed=r["client_seed"],
                ledger_user=r["l_user"], ledger_currency=r["l_currency"],
                ledger_delta=r["l_delta"],
            )
            pair = None if r["s_user"] is None else PairRow(
                bet.pair_id, r["s_user"], r["s_seed"], r["s_hash"], r["s_client"],
                r["s_final"])
            stats.failures += check_bet(bet, pair, house_edge_bp)
            repeated = nonces.feed(bet)
            if repeated is not None:
                stats.failures.append(repeated)
        where, args = _where("l.user_id", users)
        orphans = await conn.fetch(
            "SELECT l.entry_id FROM ledger l" + (where or " WHERE true") +
            " AND l.kind = 'bet' AND NOT EXISTS"
            " (SELECT 1 FROM bets b WHERE 'bet:' || b.bet_id = l.entry_id)"
            # A detached month's bets are no longer in bets (docs/partitions.md).
            " AND NOT EXISTS (SELECT 1 FROM bets_detached d"
            "  WHERE l.created_at >= d.range_from AND l.created_at < d.range_to) LIMIT 100",
            *args)
        for r in orphans:
            stats.failures.append(Failure("bets", r["entry_id"], "ledger row without a bet"))
    return stats


async def _pg_totals(
    conn: Conn, users: Sequence[int] | None
) -> dict[str, Totals]:
    totals: dict[str, Totals] = defaultdict(Totals)
    where, args = _where("user_id", users)
    for r in await conn.fetch(
        f"SELECT currency, kind, SUM(delta) AS total FROM ledger{where} GROUP BY 1, 2", *args
    ):
        t, total = totals[r["currency"]], int(r["total"])
        t.balances += total
        if r["kind"] == "deposit":
            t.deposits += total
        elif r["kind"] == "commission":
            t.commissions += total
    for r in await conn.fetch(
        f"SELECT currency, SUM(amount) AS s, SUM(payout) AS p FROM bets{where} GROUP BY 1",
        *args,
    ):
        totals[r["currency"]].stakes += int(r["s"])
        totals[r["currency"]].payouts += int(r["p"])
    # Detached months count by what was kept of them (docs/partitions.md).
    for r in await conn.fetch(
        "SELECT currency, SUM(stakes) AS s, SUM(payouts) AS p FROM bets_archived"
        f"{where} GROUP BY 1", *args,
    ):
        totals[r["currency"]].stakes += int(r["s"])
        totals[r["currency"]].payouts += int(r["p"])
    return totals


# -- I/O: Redis ----------------------------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _stream_entries(
    redis: Client, stream: str, chunk: int
) -> AsyncIterator[tuple[bytes, dict[bytes, bytes]]]:
    start = "-"
    while True:
        batch: list[tuple[bytes, dict[bytes, bytes]]] = list(
            await redis.xrange(stream, min=start, count=chunk)  # type: ignore[arg-type]
        )
        for entry_id, fields in batch:
            yield entry_id, fields
        if len(batch) < chunk:
            return
        start = "(" + _text(batch[-1][0])


async def read_pending(
    redis: Client, keys: Keys, users: Sequence[int] | None = None, chunk: int = 1000,
) -> list[events.Event]:
    """Every event still in the outbox streams (persisted or not: the caller sorts that out).

    Also returns nothing for dead letters: those are counted by :func:`read_dead`.
    """
    wanted = None if users is None else set(users)
    found: list[events.Event] = []
    for stream in keys.all_outboxes():
        async for entry_id, fields in _stream_entries(redis, stream, chunk):
            try:
                event = events.parse(fields)
            except events.Malformed:
                # The persister will dead-letter it; count it there.
                continue
            user = event_user(event)
            if wanted is None or user is None or user in wanted:
                found.append(event)
            del entry_id
    return found


async def read_dead(redis: Client, keys: Keys, users: Sequence[int] | None,
                    chunk: int = 1000) -> list[Failure]:
    """Dead-lettered entries: money that moved in Redis and will never reach the ledger."""
    wanted = None if users is None else set(users)
    out: list[Failure] = []
    async for entry_id, fields in _stream_entries(redis, keys.outbox_dead(), chunk):
        inner = {k[2:]: v for k, v in fields.items() if k.startswith(b"f:")}
        try:
            event: events.Event | None = events.parse(inner)
        except events.Malformed:
            event = None
        user = None if event is None else event_user(event)
        if wanted is not None and user not in wanted:
            continue
        out.append(Failure("outbox", f"dead letter {_text(entry_id)}",
                           f"{_text(fields.get(b'reason', b'?'))} (never persisted)"))
    return out


_DUE_SQL = """
SELECT b.currency, count(DISTINCT b.bet_id) AS bets,
       coalesce(sum((b.amount / 10000) * s.bps + (b.amount % 10000) * s.bps / 10000), 0)
           AS amount
FROM bets b CROSS JOIN LATERAL unnest(b.commission_to, b.commission_bps) AS s(user_id, bps)
WHERE b.commission_flush IS NULL AND b.commission_to IS NOT NULL {users}
GROUP BY b.currency
"""


async def read_commissions(
    redis: Client, conn: Conn, keys: Keys, pending: Pending,
    users: Sequence[int] | None,
) -> None:
    """The commission flush's work in hand (:mod:`workers.commissions`).

    - stored bets no flush has paid yet: in nobody's balance and not in the ledger.
      Reported as pending only.
    - flushes PostgreSQL paid whose credit to an ancestor has not happened yet (no marker
      for that flush and ancestor): the ledger is ahead of that ancestor's Redis balance by
      exactly that share, until the flush (or the next one) credits it. Counted in
      ``pending.uncredited``.
    """
    wanted = None if users is None else set(users)
    for r in await conn.fetch(_DUE_SQL.format(
            users="" if users is None else "AND s.user_id = ANY($1::bigint[])"),
            *(() if users is None else (list(users),))):
        pending.due_bets += int(r["bets"])
        if int(r["amount"]):
            pending.commissions[r["currency"]] += int(r["amount"])
    shares: list[tuple[str, int, str, int]] = []
    for r in await conn.fetch("SELECT flush_id, user_ids, currencies, amounts"
                              " FROM commission_flushes WHERE credited_at IS NULL"):
        for user, currency, amount in zip(r["user_ids"], r["currencies"], r["amounts"],
                                          strict=True):
            if wanted is None or user in wanted:
                shares.append((r["flush_id"], int(user), currency, int(amount)))
    if not shares:
        return
    pipe = redis.pipeline(transaction=False)
    for flush_id, user, _, _ in shares:
        pipe.exists(keys.credit_marker(flush_id, user))
    for (_, user, currency, amount), done in zip(shares, await pipe.execute(), strict=True):
        if not done:
            pending.uncredited[(user, currency)] += amount


_PAYMENTS_SQL = """
WITH flushes AS (SELECT flush_id FROM commission_flushes),
expected AS (
    SELECT b.commission_flush AS flush_id, s.user_id, b.currency,
           sum((b.amount / 10000) * s.bps + (b.amount % 10000) * s.bps / 10000)::bigint
               AS amount
    FROM bets b CROSS JOIN LATERAL unnest(b.commission_to, b.commission_bps)
         AS s(user_id, bps)
    WHERE b.commission_flush IS NOT NULL {users_s}
    GROUP BY 1, 2, 3
    HAVING sum((b.amount / 10000) * s.bps + (b.amount % 10000) * s.bps / 10000) > 0
), booked AS (
    -- A row of a flush this table does not know was paid before bets recorded their rates
    -- (migration 004 marked those bets 'legacy'): compared in sum.
    SELECT CASE WHEN f.flush_id IS NULL THEN 'legacy' ELSE f.flush_id END AS flush_id,
           l.user_id, l.currency, sum(l.delta)::bigint AS amount
    FROM ledger l LEFT JOIN flushes f ON f.flush_id = split_part(l.entry_id, ':', 2)
    WHERE l.kind = 'commission' {users_l}
    GROUP BY 1, 2, 3
)
SELECT flush_id, user_id, currency, e.amount AS expected, k.amount AS booked
FROM expected e FULL JOIN booked k USING (flush_id, user_id, currency)
WHERE e.amount IS DISTINCT FROM k.amount
ORDER BY flush_id, user_id, currency
LIMIT 100
"""


async def check_commission_payments(conn: Conn, users: Sequence[int] | None,
                                    horizon_s: float = commissions.CREDIT_HORIZON_S,
                                    ) -> list[Failure]:
    """(b'): every commission the ledger holds, recomputed from the stored bets and the
    rates each recorded; and no flush left uncredited past the workers' horizon."""
    sql = _PAYMENTS_SQL.format(
        users_s="" if users is None else "AND s.user_id = ANY($1::bigint[])",
        users_l="" if users is None else "AND l.user_id = ANY($1::bigint[])")
    args = () if users is None else (list(users),)
    out = [Failure("commissions", f"flush {r['flush_id']} user {r['user_id']} {r['currency']}",
                   f"the bets it paid owe {r['expected'] or 0}, the ledger holds "
                   f"{r['booked'] or 0}")
           for r in await conn.fetch(sql, *args)]
    for r in await conn.fetch(
            "SELECT flush_id, created_at FROM commission_flushes WHERE credited_at IS NULL"
            " AND created_at <= now() - make_interval(secs => $1)", float(horizon_s)):
        out.append(Failure("commissions", f"flush {r['flush_id']}",
                           f"paid {r['created_at']:%Y-%m-%d %H:%M} and never credited in "
                           "Redis: the workers no longer retry it; heal the ancestors' "
                           "balances from the ledger"))
    return out


async def check_commission_totals(conn: Conn, users: Sequence[int] | None) -> list[Failure]:
    """``commission_totals`` is the running sum of the ledger's commission rows."""
    where, args = _where("user_id", users)
    rows = await conn.fetch(f"""
        WITH l AS (SELECT user_id, currency, SUM(delta) AS earned FROM ledger{where}
                   {"AND" if where else "WHERE"} kind = 'commission' GROUP BY 1, 2),
             t AS (SELECT user_id, currency, earned FROM commission_totals{where})
        SELECT user_id, currency, l.earned AS ledger, t.earned AS total
        FROM l FULL JOIN t USING (user_id, currency)
        WHERE l.earned IS DISTINCT FROM t.earned LIMIT 100""", *args)
    return [Failure("commissions", f"user {r['user_id']} {r['currency']}",
                    f"commission_totals {r['total']}, ledger {r['ledger']}") for r in rows]


async def _hgetall_many(redis: Client, keys: Keys,
                        users: Sequence[int]) -> dict[int, Money]:
    pipe = redis.pipeline(transaction=False)
    for user in users:
        pipe.hgetall(keys.balances(user))
    replies = await pipe.execute()
    return {
        user: {_text(c): int(v) for c, v in reply.items()}
        for user, reply in zip(users, replies, strict=True)
    }


async def _stale(redis: Client, keys: Keys, users: Sequence[int]) -> set[int]:
    """The users whose heal marker does not hold the run id of the Redis holding their keys
    (plumbing/heal.py)."""
    pipe = redis.pipeline(transaction=False)
    for user in users:
        pipe.get(keys.healed(user))
    markers = await pipe.execute()
    run_ids = await heal.run_ids(redis, keys, users)
    return {u for u, m in zip(users, markers, strict=True)
            if m is None or _text(m) != run_ids[u]}


async def _redis_balance_users(
    redis: Client, keys: Keys, chunk: int
) -> AsyncIterator[list[int]]:
    """User ids of every balance hash in Redis, a SCAN page at a time."""
    page: list[int] = []
    async for key in scan_keys(redis, keys.scan_match("bal"), chunk):
        tail = _text(key).rsplit(":", 1)[-1]
        if tail.isdigit():
            page.append(int(tail))
        if len(page) >= chunk:
            yield page
            page = []
    if page:
        yield page


# -- (b) and (c) ---------------------------------------------------------------------------------


async def audit_money(
    redis: Client, pool: asyncpg.Pool, keys: Keys,
    users: Sequence[int] | None = None, chunk: int = CHUNK,
) -> MoneyReport:
    """Balances (b) and conservation (c), on both sides, with the pending outbox counted."""
    report = MoneyReport()
    pending = report.pending
    waiting = await read_pending(redis, keys, users)
    pending.failures += await read_dead(redis, keys, users)
    pending.dead = len(pending.failures)

    async with pool.acquire() as conn, conn.transaction(
        isolation="repeatable_read", readonly=True
    ):
        await read_commissions(redis, conn, keys, pending, users)
        report.failures += await check_commission_totals(conn, users)
        report.failures += await check_commission_payments(conn, users)
        # Which of the events in the streams are committed already (not yet XDEL'd)?
        ids = [i for i in (ledger_id(e) for e in waiting) if i is not None]
        done = {r["entry_id"] for r in await conn.fetch(
            "SELECT entry_id FROM ledger WHERE entry_id = ANY($1::text[])", ids)} if ids else set()
        for event in waiting:
            if ledger_id(event) in done:
                pending.persisted += 1
            else:
                add_event(pending, event)

        report.pg = await _pg_totals(conn, users)
        await check_told(conn, waiting, done, report, users)

        # Every user with ledger rows, a chunk at a time, against its Redis hash.
        seen_redis: Money = defaultdict(int)
        checked: set[int] = set()  # only users without ledger rows (few): SCAN repeats keys

        async def compare(batch: dict[int, Money]) -> None:
            redis_balances = await _hgetall_many(redis, keys, list(batch))
            stale = await _stale(redis, keys, list(batch))
            for user, ledger in batch.items():
                if not ledger:
                    checked.add(user)
                have = redis_balances[user]
                report.users += 1
                if user in stale:
                    report.awaiting_heal += 1
                    have = due_balances(user, ledger, pending.deltas, pending.uncredited)
                report.failures += compare_balances(user, ledger, have, pending.deltas,
                                                    pending.uncredited)
                for currency, amount in have.items():
                    seen_redis[currency] += amount

        where, args = _where("user_id", users)
        batch: dict[int, Money] = {}
        async for r in _rows(
            conn, f"SELECT user_id, currency, SUM(delta) AS total FROM ledger{where}"
            " GROUP BY user_id, currency ORDER BY user_id", args, chunk,
        ):
            user = int(r["user_id"])
            if user not in batch and len(batch) >= chunk:
                await compare(batch)
                batch = {}
            batch.setdefault(user, {})[r["currency"]] = int(r["total"])
        if batch:
            await compare(batch)

        # Users with a Redis balance but no ledger row at all (only pending events, or
        # money that came from nowhere).
        async def without_ledger(candidates: list[int]) -> None:
            known = {int(r["user_id"]) for r in await conn.fetch(
                "SELECT DISTINCT user_id FROM ledger WHERE user_id = ANY($1::bigint[])",
                candidates)}
            rest = [u for u in candidates if u not in known and u not in checked]
            if rest:
                await compare({u: {} for u in rest})

        if users is None:
            async for page in _redis_balance_users(redis, keys, chunk):
                await without_ledger(page)
        else:
            await without_ledger(list(users))
        # A pending event's user whose hash is gone and who has no ledger row yet.
        await without_ledger(sorted({u for u, _ in pending.deltas}))
        await without_ledger(sorted({u for u, _ in pending.uncredited}))

    # (c) on both sides.
    for currency in set(report.pg) | set(pending.deposited) | set(pending.stakes) | set(
        seen_redis
    ):
        pg, rd = report.pg.get(currency, Totals()), report.redis[currency]
        rd.commissions = pg.commissions - sum(
            v for (_, c), v in pending.uncredited.items() if c == currency)
        rd.deposits = pg.deposits + pending.deposited.get(currency, 0)
        rd.stakes = pg.stakes + pending.stakes.get(currency, 0)
        rd.payouts = pg.payouts + pending.payouts.get(currency, 0)
        rd.balances = seen_redis.get(currency, 0)
    report.failures += check_conservation("PostgreSQL", report.pg)
    report.failures += check_conservation("Redis + pending outbox", report.redis)
    report.failures += pending.failures
    return report


_TOLD_SQL = """
SELECT s.pair_id, s.user_id,
       GREATEST(COALESCE(s.final_nonce, 0), COALESCE(max(b.nonce), 0)) AS top,
       count(DISTINCT b.nonce) FILTER (WHERE b.nonce >= 1) AS held
FROM seed_pairs s LEFT JOIN bets b ON b.pair_id = s.pair_id{where}
GROUP BY s.pair_id, s.user_id
HAVING GREATEST(COALESCE(s.final_nonce, 0), COALESCE(max(b.nonce), 0))
       > count(DISTINCT b.nonce) FILTER (WHERE b.nonce >= 1)
"""


async def check_told(conn: Conn, waiting: Sequence[events.Event], done: set[str],
                     report: MoneyReport, users: Sequence[int] | None) -> None:
    """(d): for every pair, the nonces up to its top that neither ``bets`` nor the outbox
    holds (a bet settles nonces 1, 2, ... in order, so each one below the top was told)."""
    queued: dict[int, set[int]] = defaultdict(set)
    for event in waiting:
        if isinstance(event, events.BetEvent) and ledger_id(event) not in done:
            queued[event.pair_id].add(event.nonce)
    where, args = _where("s.user_id", users)
    for r in await conn.fetch(_TOLD_SQL.format(where=where), *args):
        top, held = int(r["top"]), int(r["held"])
        missing = top - held - sum(1 for n in queued.get(int(r["pair_id"]), ()) if n <= top)
        if missing > 0:
            report.told_not_held += missing
            report.failures.append(Failure(
                "told", f"pair {r['pair_id']} (user {r['user_id']})",
                f"{missing} bet(s) with a nonce up to {top} were settled and are held by "
                "neither PostgreSQL nor the outbox"))


# -- the command ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Audit:
    bets: BetStats
    money: MoneyReport
    elapsed_s: float

    @property
    def failures(self) -> list[Failure]:
        return self.bets.failures + self.money.failures

    @property
    def ok(self) -> bool:
        return not self.failures


async def run(
    settings: Settings, users: Sequence[int] | None = None, retries: int = 2,
    retry_delay_s: float = 1.0, chunk: int = CHUNK,
) -> Audit:
    """Every check, with failures of (b) and (c) re-checked ``retries`` times."""
    started = time.monotonic()
    keys = Keys(settings.key_prefix, settings.buckets)
    redis = await open_client(settings.redis_url)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            bets = await audit_bets(conn, settings.house_edge_bp, users, chunk)
        money = await audit_money(redis, pool, keys, users, chunk)
        for _ in range(retries):
            if not money.failures:
                break
            await asyncio.sleep(retry_delay_s)
            money = await audit_money(redis, pool, keys, users, chunk)
    finally:
        await pool.close()
        await redis.aclose()
    return Audit(bets, money, time.monotonic() - started)


def summary(audit: Audit, currencies: Iterable[str] | None = None) -> str:
    """The printed report: counts, a per-currency table, pending work, the failures."""
    m, p = audit.money, audit.money.pending
    lines = [
        f"bets checked      {audit.bets.bets}   seed pairs {audit.bets.pairs}   "
        f"users {m.users}   ({audit.elapsed_s:.1f} s)",
        f"outbox pending    {p.events} events ({p.bets} bets, {p.deposits} deposits, "
        f"{p.reveals} reveals; {p.persisted} committed awaiting ack)   dead letters {p.dead}",
        f"told, not held    {m.told_not_held} bets (settled, in neither store)   "
        f"awaiting heal {m.awaiting_heal} users",
        f"commissions       {p.due_bets} bets not yet paid by a flush: "
        + (", ".join(f"{c} {v}" for c, v in sorted(p.commissions.items())) or "none")
        + "; paid, not yet credited: " + (", ".join(
            f"user {u} {c} {v}" for (u, c), v in sorted(p.uncredited.items())) or "none"),
        "",
    ]
    head = ("currency", "side", "deposits", "balances", "commissions", "stakes", "payouts",
            "house", "gap")
    rows: list[tuple[str, ...]] = [head]
    names = sorted(set(m.pg) | set(m.redis) | set(currencies or ()))
    for currency in names:
        for side, t in (("postgres", m.pg.get(currency)), ("redis", m.redis.get(currency))):
            t = t or Totals()
            rows.append((currency, side, str(t.deposits), str(t.balances), str(t.commissions),
                         str(t.stakes), str(t.payouts), str(t.house), f"{t.gap:+d}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        lines.append("  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
            enumerate(zip(r, widths, strict=True))
        ))
    lines.append("")
    if audit.ok:
        lines.append("AUDIT OK: every bet recomputes, every balance matches the ledger, "
                     "money is conserved to the minor unit")
    else:
        failures = audit.failures
        lines.append(f"AUDIT FAILED: {len(failures)} problem(s)")
        lines += [f"  {f}" for f in failures[:200]]
        if len(failures) > 200:
            lines.append(f"  ... and {len(failures) - 200} more")
    return "\n".join(lines)


def _users_arg(text: str) -> list[int]:
    try:
        return [int(u) for u in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError("--users takes user ids: 1,2,3") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ops.audit", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--users", type=_users_arg, default=None,
                        help="only these user ids (comma-separated); conservation then "
                             "holds for that set")
    parser.add_argument("--retries", type=int, default=2,
                        help="re-check balance/conservation failures this often (live system)")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="rows per cursor fetch")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings()
    try:
        audit = asyncio.run(run(settings, args.users, args.retries, chunk=args.chunk))
    except asyncpg.UndefinedTableError as exc:
        print(f"audit: the database is not migrated ({exc}); start the server once "
              "(make run) to create the schema", file=sys.stderr)
        return 2
    print(summary(audit, settings.currencies))
    return 0 if audit.ok else 1


if __name__ == "__main__":
    sys.exit(main())
