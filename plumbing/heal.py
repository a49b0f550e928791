"""Heal one user: bring the user's Redis state back to the ledger after Redis may have
rolled back (a restart from an AOF that lost its last writes, a failover to a replica that
had not received them). docs/durability.md has the whole argument; in short:

Every money script of a user (bet-n, deposit-5, rotate-3, commission-credit-n) refuses with
a code of its own (HEAL) while the user's heal marker (:meth:`Keys.healed`) does not hold the
run id of the Redis it runs on. Redis gives every start a new run id, so after any restart
every user is refused once, and the caller (the server before a bet, a deposit, a rotation or
a sign-in; the commission flush before a credit) calls :func:`heal`:

1. read the user's events still in the outbox (XRANGE of the bucket's stream, FIRST);
2. read PostgreSQL in one snapshot: the ledger's sums, which of those events it holds, the
   user's bets within the idempotency window, the user's deposits;
3. in the same snapshot, which of the commission units still unfinished in Redis PostgreSQL
   has paid (the flush credits a unit only after paying it);
4. call lua/heal-n.lua once: if the marker is still stale, set the balances to ledger +
   outbox events the ledger lacks (+ deposits neither store credited, which it credits now
   through the outbox), restore the bet and deposit idempotency records, set the credit
   markers of the paid units, and set the marker.

Why the truth is complete and nothing counts twice: while the marker is stale no script
adds an event of the user, so the set of the user's events is fixed during 1-4. An event in
the outbox at 1 is counted from there (and once: the union is keyed by its ledger entry id,
so one that was persisted between 1 and 2 is in both and counts once); one not in the
outbox at 1 had been acknowledged, which happens only after its COMMIT, so PostgreSQL holds
it at 2. A commission paid by PostgreSQL after 2 is not in the sums and its credit (refused
until the marker is set) is made afterwards by its flush, whose marker the heal did not set;
one paid before 2 and still to be credited is in a unit Redis lists at 3 (a unit is dropped
only after all its credits), and its marker is set, so it is counted once, by the heal.
Two processes healing one user compute the same truth; the second script call is a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from redis.asyncio.cluster import RedisCluster

from games.codes import HealCode
from plumbing import events, scripts
from plumbing.keys import COMMISSION_RECHECK_S, Keys
from plumbing.redisclient import Client, each_master_info
from plumbing.settings import Settings

log = structlog.get_logger(__name__)

#: The idempotency window a heal restores bet records for when its caller has no settings
#: of its own (the commission flush healing an ancestor).
DEFAULT_WINDOW_MS = int(Settings.model_fields["idempotency_window_s"].default) * 1000
#: Lifetime of the credit markers the heal sets: as the flush's own (workers/commissions.py).
CREDIT_MARKER_TTL_S = 7 * 24 * 3600
#: Outbox entries read per XRANGE page.
PAGE = 1000

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(slots=True)
class Truth:
    """What lua/heal-n.lua is given for one user."""

    balances: dict[str, int] = field(default_factory=dict)
    #: (key, record value, remaining lifetime ms) of each bet within the window.
    bet_records: list[tuple[str, bytes, int]] = field(default_factory=list)
    #: (key, fingerprint, balance, event blob to credit now or b"") of each deposit.
    deposit_records: list[tuple[str, str, int, bytes]] = field(default_factory=list)
    credit_markers: list[str] = field(default_factory=list)
    #: Deposits that neither store had credited (the heal credits them): their keys.
    credited_now: list[str] = field(default_factory=list)


async def run_id(redis: Client, keys: Keys, user_id: int) -> str:
    """The run id of the Redis that holds ``user_id``'s keys (on a cluster, the master of
    the user's slot: each shard restarts, and may roll back, on its own). Asked with a
    one-key script call (lua/runid-1.lua), which a cluster client routes by the slot and
    redirects on MOVED: its slot map alone may still name a failed-over master."""
    reply = await scripts.run_one(redis, scripts.RUN_ID, [keys.healed(user_id)], [])
    return reply.decode() if isinstance(reply, bytes) else str(reply)


async def run_ids(redis: Client, keys: Keys, users: Iterable[int]) -> dict[int, str]:
    """:func:`run_id` of many users, with one INFO per master instead of one per user (the
    audit and the rebuild judge thousands of users at a time)."""
    users = list(users)
    infos = await each_master_info(redis, "server")
    if not isinstance(redis, RedisCluster):
        rid = str(next(iter(infos.values()))["run_id"])
        return dict.fromkeys(users, rid)
    by_node = {name: str(info["run_id"]) for name, info in infos.items()}
    out: dict[int, str] = {}
    for user in users:
        node = redis.get_node_from_key(keys.healed(user))
        known = None if node is None else by_node.get(node.name)
        # A slot map newer than the INFO replies (a failover in between): ask that node.
        out[user] = known if known is not None else await run_id(redis, keys, user)
    return out


async def mark_new(redis: Client, keys: Keys, user_id: int) -> None:
    """Mark a user just created (nothing of it can be in the ledger yet) as healed under the
    running Redis. Should Redis restart between the two calls, the marker names the old run
    and the user is healed on first use, as any other."""
    await redis.set(keys.healed(user_id), await run_id(redis, keys, user_id), nx=True)


async def is_healed(redis: Client, keys: Keys, user_id: int) -> bool:
    """Whether the user's marker holds the run id of the Redis answering now."""
    marker = await redis.get(keys.healed(user_id))
    return marker is not None and _text(marker) == await run_id(redis, keys, user_id)


async def heal(redis: Client, pool: asyncpg.Pool, keys: Keys, user_id: int,
               window_ms: int = DEFAULT_WINDOW_MS) -> bool:
    """Heal ``user_id`` (see the module docstring). True when this call healed, False when
    the user was healed already (by another process, or by an earlier call)."""
    rid = await run_id(redis, keys, user_id)
    pending = await _outbox_events(redis, keys, user_id)
    now_ms = int(time.time() * 1000)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                        readonly=True):
        truth = await _truth(conn, keys, user_id, pending, window_ms, now_ms)
        truth.credit_markers = await _credit_markers(redis, conn, keys, user_id)
    reply = await scripts.run_one(redis, scripts.HEAL, *_call(keys, user_id, rid, truth))
    healed = int(reply[0]) == HealCode.HEALED
    if healed:
        log.warning("user_healed", user_id=user_id, balances=truth.balances,
                    pending_events=len(pending), bet_records=len(truth.bet_records),
                    deposits_credited_now=truth.credited_now)
    return healed


async def _outbox_events(redis: Client, keys: Keys, user_id: int
                         ) -> list[events.BetEvent | events.DepositEvent]:
    """The user's bet and deposit events in the bucket's outbox, oldest first. An entry
    that cannot be decoded is skipped: the persister dead-letters it and the audit counts
    it (its money never reaches the ledger)."""
    stream = keys.outbox_for(user_id)
    out: list[events.BetEvent | events.DepositEvent] = []
    start = "-"
    while True:
        page: list[Any] = list(await redis.xrange(stream, start, "+", count=PAGE) or [])
        for _, fields in page:
            try:
                event = events.parse(fields or {})
            except events.Malformed:
                continue
            if isinstance(event, events.BetEvent | events.DepositEvent) \
                    and event.user_id == user_id:
                out.append(event)
        if len(page) < PAGE:
            return out
        last = _text(page[-1][0])
        ms, _, seq = last.partition("-")
        start = f"{ms}-{int(seq) + 1}"


def _entry_id(event: events.BetEvent | events.DepositEvent) -> str:
    """The event's ledger entry id (workers/outbox.py writes the same)."""
    if isinstance(event, events.BetEvent):
        return f"bet:{event.bet_id}"
    return f"dep:{event.key}"


def fingerprint(currency: str, amount: int, target: int, direction: str) -> str:
    """games.bets.fingerprint of a stored bet's fields."""
    return f"{currency}|{amount}|{target}|{direction}"


async def _truth(conn: Conn, keys: Keys, user_id: int,
                 pending: list[events.BetEvent | events.DepositEvent], window_ms: int,
                 now_ms: int) -> Truth:
    truth = Truth()
    for r in await conn.fetch(
        "SELECT currency, sum(delta)::bigint AS total FROM ledger WHERE user_id = $1"
        " GROUP BY currency", user_id,
    ):
        truth.balances[r["currency"]] = int(r["total"])
    held = {r["entry_id"] for r in await conn.fetch(
        "SELECT entry_id FROM ledger WHERE entry_id = ANY($1::text[])",
        [_entry_id(e) for e in pending],
    )}
    # Events only the outbox has: their money is not in the sums yet.
    outbox_deposits: dict[str, events.DepositEvent] = {}
    outbox_bets: dict[str, events.BetEvent] = {}
    for e in pending:
        if isinstance(e, events.DepositEvent):
            outbox_deposits[e.key] = e
        else:
            outbox_bets[e.bet_id] = e
        if _entry_id(e) in held:
            continue
        delta = e.payout - e.amount if isinstance(e, events.BetEvent) else e.amount
        truth.balances[e.currency] = truth.balances.get(e.currency, 0) + delta

    # Deposits PostgreSQL has a row of but neither store credited: credited by this heal.
    lost: list[tuple[str, str, int]] = []
    deposits = await conn.fetch(
        "SELECT d.idempotency_key, d.currency, d.amount, l.entry_id IS NOT NULL AS credited"
        " FROM deposits d LEFT JOIN ledger l ON l.entry_id = 'dep:' || d.idempotency_key"
        " WHERE d.user_id = $1 ORDER BY d.created_at", user_id,
    )
    for r in deposits:
        key = r["idempotency_key"]
        if not r["credited"] and key not in outbox_deposits:
            lost.append((key, r["currency"], int(r["amount"])))
            truth.balances[r["currency"]] = truth.balances.get(r["currency"], 0) \
                + int(r["amount"])
    for r in deposits:
        key, currency, amount = r["idempotency_key"], r["currency"], int(r["amount"])
        blob = b""
        if any(k == key for k, _, _ in lost):
            blob = events.encode_deposit(key, user_id, currency, amount, now_ms)
            truth.credited_now.append(key)
        # The balance right after the deposit is known only while its event is in the
        # outbox; otherwise a replay answers with the healed balance (as ops.rebuild does).
        queued = outbox_deposits.get(key)
        balance = queued.balance_after if queued is not None \
            else truth.balances.get(currency, 0)
        truth.deposit_records.append((keys.deposit_idem(user_id, key),
                                      f"{user_id}|{currency}|{amount}", balance, blob))

    # Bet records of the window, from PostgreSQL and from the outbox (the union by bet id).
    rows = await conn.fetch(
        "SELECT bet_id, pair_id, currency, amount, payout, roll, target, direction, nonce,"
        " multiplier, server_seed_hash, client_seed, balance_after, client_id,"
        " (extract(epoch FROM created_at) * 1000)::bigint AS ts"
        " FROM bets WHERE user_id = $1 AND client_id IS NOT NULL"
        " AND created_at > to_timestamp($2 / 1000.0)", user_id, now_ms - window_ms,
    )
    stored = [events.BetEvent(
        r["bet_id"], user_id, int(r["pair_id"]), r["currency"], int(r["amount"]),
        int(r["payout"]), int(r["roll"]), int(r["target"]), r["direction"], int(r["nonce"]),
        int(r["multiplier"]), r["server_seed_hash"], r["client_seed"], int(r["ts"]),
        int(r["balance_after"]), r["client_id"],
    ) for r in rows]
    seen: set[str] = set()
    prefix = keys.bet_idem_prefix(user_id)
    for b in [*outbox_bets.values(), *stored]:
        if b.bet_id in seen or b.client_id is None:
            continue
        seen.add(b.bet_id)
        left = window_ms - (now_ms - b.ts)
        if left <= 0:
            continue
        blob = events.encode_bet(
            b.bet_id, user_id, b.pair_id, b.currency, b.amount, b.payout, b.roll, b.target,
            b.direction, b.nonce, b.multiplier, b.server_seed_hash, b.client_seed, b.ts,
            b.client_id,
        )
        value = (f"{fingerprint(b.currency, b.amount, b.target, b.direction)}\n"
                 f"{b.balance_after}\n").encode() + blob
        # client_ref is what bet_idem_key appends to the prefix.
        truth.bet_records.append((prefix + b.client_id, value, left))
    return truth


async def _credit_markers(redis: Client, conn: Conn, keys: Keys,
                          user_id: int) -> list[str]:
    """The credit markers to set for the user: one per commission flush that paid the user
    and whose credit a later flush may still make: not yet recorded as credited, or
    recorded within :data:`COMMISSION_RECHECK_S` (a flush re-credits those when Redis lost
    their markers, workers/commissions.py). The heal's balance already holds their ledger
    rows, so the markers keep those credits from being added again."""
    rows = await conn.fetch(
        "SELECT flush_id FROM commission_flushes WHERE $1 = ANY(user_ids)"
        " AND (credited_at IS NULL OR credited_at > now() - make_interval(secs => $2))",
        user_id, float(2 * COMMISSION_RECHECK_S),
    )
    return [keys.credit_marker(r["flush_id"], user_id) for r in rows]


def _call(keys: Keys, user_id: int, rid: str, truth: Truth) -> tuple[list[str], list[Any]]:
    call_keys = [keys.healed(user_id), keys.balances(user_id), keys.outbox_for(user_id)]
    args: list[Any] = [rid, len(truth.bet_records), len(truth.deposit_records),
                       len(truth.credit_markers), CREDIT_MARKER_TTL_S, len(truth.balances)]
    for currency, amount in sorted(truth.balances.items()):
        args += (currency, str(amount))
    for key, value, left in truth.bet_records:
        call_keys.append(key)
        args += (value, str(left))
    for key, fp, balance, blob in truth.deposit_records:
        call_keys.append(key)
        args += (fp, str(balance), blob)
    call_keys += truth.credit_markers
    return call_keys, args


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

