"""Outbox -> PostgreSQL: drain the bucket streams the Lua scripts append to.

Every settled bet, credited deposit and revealed seed pair is written by its Lua script into
the outbox stream of the user's bucket (``keys.outbox(b)``), in the same atomic call that
moved the money. This module moves those events into PostgreSQL, at least once and
idempotently (every row has a key derived from the event: ``bet_id``, ``bet:<bet_id>``,
``dep:<key>``, the pair id), so a crash anywhere only ever causes a replay that inserts
nothing twice.

The functions are plain coroutines over a redis.asyncio client (bytes replies, not
``decode_responses``), an asyncpg pool and :class:`server.keys.Keys`, so the in-process loop
(:mod:`server.persister`) and the Dramatiq actors can share them.

Life of an entry, per consumer group (``persist``)::

    XADD (Lua) -> XREADGROUP ">" -> one PostgreSQL transaction -> COMMIT
               -> XACK + XDEL + commission accrual, one atomic script for the batch

The cost is per batch where it can be (bench/drainbench.py measures it): one XREADGROUP
over every stream, COPY into a staging table and one INSERT for the bets and their ledger
rows, one script call for the ack; per bet only the decoding (:func:`bet_row`) and the
commission arithmetic are Python.

- Nothing is acknowledged before COMMIT. A consumer that dies between the read and the ack
  leaves the entries in its pending list; :func:`reclaim` (XAUTOCLAIM, idle > 30 s) hands them
  to a live consumer. A consumer that failed itself re-reads its own pending list with
  ``drain_once(pending=True)``.
- Acknowledged entries are deleted (XDEL), so a stream's length is exactly what is not yet
  persisted (:func:`pending_count`). NOTE: XDEL removes the entry for every group; a second
  consumer group on these streams (e.g. a commission fan-out) would need the deletion to wait
  for it too (trim by the smallest id every group has acknowledged, or XACKDEL ... ACKED on
  Redis >= 8.2) - or do its work inside the same transaction as here.
- An entry that cannot be decoded, or that PostgreSQL rejects as data (SQLSTATE class 22/23),
  is copied into the dead-letter stream ``{prefix}:outbox-dead`` with the reason, then
  acknowledged: it never blocks the stream, and it is never silently dropped.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import asyncpg
import msgpack
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from games.commission import MAX_BPS
from server.keys import Keys
from server.scripts import Script
from workers import commissions, faults

log = structlog.get_logger(__name__)

GROUP = "persist"
#: Entries pending longer than this on some consumer are presumed orphaned by a dead process.
RECLAIM_IDLE_MS = 30_000

_I64 = (-(2**63), 2**63 - 1)
_I32 = (-(2**31), 2**31 - 1)


class Malformed(ValueError):
    """An outbox entry that cannot be turned into rows."""


class Entry(NamedTuple):
    """One stream entry as read: the stream it came from, its id, its raw fields."""

    stream: bytes
    id: bytes
    fields: Mapping[bytes, bytes] | None  # None: deleted while pending


@dataclass(frozen=True, slots=True)
class BetEvent:
    bet_id: str
    user_id: int
    pair_id: int
    currency: str
    amount: int
    payout: int
    roll: int
    target: int
    direction: str
    nonce: int
    multiplier: int
    server_seed_hash: str
    client_seed: str
    ts: int
    balance_after: int


@dataclass(frozen=True, slots=True)
class DepositEvent:
    key: str
    user_id: int
    currency: str
    amount: int
    ts: int
    balance_after: int


@dataclass(frozen=True, slots=True)
class RevealEvent:
    pair_id: int
    final_nonce: int
    ts: int


Event = BetEvent | DepositEvent | RevealEvent

#: The fields of a bet event, in the order of the list-shaped blob (a map is accepted too).
BET_FIELDS = ("bet_id", "user_id", "pair_id", "currency", "amount", "payout", "roll", "target",
              "direction", "nonce", "multiplier", "server_seed_hash", "client_seed", "ts")

#: One ``bets`` row as written: the columns of _BETS_SQL in order, ``ts`` last.
BetRow = tuple[str, int, int, str, int, int, int, int, str, int, int, str, str, int, int]


def dead_letter_key(keys: Keys) -> str:
    """Stream of entries that could not be persisted, kept for a person to look at."""
    return f"{keys.prefix}:outbox-dead"


# -- decoding --------------------------------------------------------------------------------


def _int(value: Any, name: str, bounds: tuple[int, int] = _I64) -> int:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        text = value.strip()
        if not text or not text.lstrip("-").isdigit():
            raise Malformed(f"{name} is not an integer: {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Malformed(f"{name} is not an integer: {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise Malformed(f"{name} out of range: {value}")
    return value


def _str(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError as exc:
            raise Malformed(f"{name} is not UTF-8") from exc
    if not isinstance(value, str) or not value:
        raise Malformed(f"{name} is not a non-empty string: {value!r}")
    return value


def _blob(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    raw = fields.get(b"e")
    if raw is None:
        raise Malformed("no event blob")
    try:
        event = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        raise Malformed(f"event blob is not msgpack: {exc}") from exc
    if isinstance(event, list) and len(event) == len(BET_FIELDS) and fields.get(b"k") == b"bet":
        return dict(zip(BET_FIELDS, event, strict=True))
    if not isinstance(event, dict):
        raise Malformed("event blob is not a map")
    return event


def _get(event: Mapping[str, Any], name: str) -> Any:
    try:
        return event[name]
    except KeyError:
        raise Malformed(f"missing {name}") from None


def parse(fields: Mapping[bytes, bytes]) -> Event:
    """Turn one entry's fields into an event; raises :class:`Malformed`."""
    kind = fields.get(b"k")
    if kind == b"bet":
        e = _blob(fields)
        bet = BetEvent(
            bet_id=_str(_get(e, "bet_id"), "bet_id"),
            user_id=_int(_get(e, "user_id"), "user_id"),
            pair_id=_int(_get(e, "pair_id"), "pair_id"),
            currency=_str(_get(e, "currency"), "currency"),
            amount=_int(_get(e, "amount"), "amount"),
            payout=_int(_get(e, "payout"), "payout"),
            roll=_int(_get(e, "roll"), "roll", _I32),
            target=_int(_get(e, "target"), "target", _I32),
            direction=_str(_get(e, "direction"), "direction"),
            nonce=_int(_get(e, "nonce"), "nonce"),
            multiplier=_int(_get(e, "multiplier"), "multiplier", _I32),
            server_seed_hash=_str(_get(e, "server_seed_hash"), "server_seed_hash"),
            client_seed=_str(_get(e, "client_seed"), "client_seed"),
            ts=_int(_get(e, "ts"), "ts"),
            balance_after=_int(fields.get(b"b"), "b"),
        )
        if bet.amount <= 0 or bet.payout < 0:
            raise Malformed(f"bet amounts out of range: {bet.amount} -> {bet.payout}")
        if bet.direction not in ("under", "over"):
            raise Malformed(f"bad direction {bet.direction!r}")
        _int(bet.payout - bet.amount, "delta")
        return bet
    if kind == b"deposit":
        e = _blob(fields)
        dep = DepositEvent(
            key=_str(_get(e, "key"), "key"),
            user_id=_int(_get(e, "user_id"), "user_id"),
            currency=_str(_get(e, "currency"), "currency"),
            amount=_int(_get(e, "amount"), "amount"),
            ts=_int(_get(e, "ts"), "ts"),
            balance_after=_int(fields.get(b"b"), "b"),
        )
        if dep.amount <= 0:
            raise Malformed(f"deposit amount out of range: {dep.amount}")
        return dep
    if kind == b"reveal":
        return RevealEvent(
            pair_id=_int(fields.get(b"pid"), "pid"),
            final_nonce=_int(fields.get(b"n"), "n"),
            ts=_int(fields.get(b"ts"), "ts"),
        )
    raise Malformed(f"unknown kind {kind!r}")


_unpackb = msgpack.unpackb
_DIRECTIONS = frozenset(("under", "over"))


def bet_row(fields: Mapping[bytes, bytes]) -> BetRow:
    """A bet entry's ``bets`` row; raises :class:`Malformed` exactly when :func:`parse` does.

    The hot path of the worker: the blob (a map, or the list ``BET_FIELDS``) is unpacked and
    its values checked in a few type tests; anything unusual (a numeric string, a missing
    field, a value out of range) goes through :func:`parse`, which accepts or explains it.
    """
    try:
        e = _unpackb(fields[b"e"])
        if type(e) is dict:
            bet_id = e["bet_id"]
            user_id = e["user_id"]
            pair_id = e["pair_id"]
            currency = e["currency"]
            amount = e["amount"]
            payout = e["payout"]
            roll = e["roll"]
            target = e["target"]
            direction = e["direction"]
            nonce = e["nonce"]
            multiplier = e["multiplier"]
            server_seed_hash = e["server_seed_hash"]
            client_seed = e["client_seed"]
            ts = e["ts"]
        else:
            (bet_id, user_id, pair_id, currency, amount, payout, roll, target, direction,
             nonce, multiplier, server_seed_hash, client_seed, ts) = e
        balance = fields[b"b"]
        if (
            type(bet_id) is str and type(currency) is str and type(server_seed_hash) is str
            and type(client_seed) is str and bet_id and currency and server_seed_hash
            and client_seed and direction in _DIRECTIONS
            and type(user_id) is int and type(pair_id) is int and type(amount) is int
            and type(payout) is int and type(roll) is int and type(target) is int
            and type(nonce) is int and type(multiplier) is int and type(ts) is int
            and type(balance) is bytes and balance.isdigit()
            and 0 < amount <= _I64[1] and 0 <= payout <= _I64[1]
            and _I64[0] <= min(user_id, pair_id, nonce, ts)
            and max(user_id, pair_id, nonce, ts) <= _I64[1]
            and _I32[0] <= min(roll, target, multiplier)
            and max(roll, target, multiplier) <= _I32[1]
        ):
            balance_after = int(balance)
            if balance_after <= _I64[1]:
                return (bet_id, user_id, pair_id, currency, amount, payout, roll, target,
                        direction, nonce, multiplier, server_seed_hash, client_seed,
                        balance_after, ts)
    except Exception:
        pass
    event = parse(fields)
    if not isinstance(event, BetEvent):
        raise Malformed(f"not a bet: {fields.get(b'k')!r}")
    return _row(event)


def _row(e: BetEvent) -> BetRow:
    return (e.bet_id, e.user_id, e.pair_id, e.currency, e.amount, e.payout, e.roll, e.target,
            e.direction, e.nonce, e.multiplier, e.server_seed_hash, e.client_seed,
            e.balance_after, e.ts)


# -- writing ---------------------------------------------------------------------------------

# Bets go to PostgreSQL by COPY into a session-local staging table, then one statement
# inserts them and their ledger rows (entry "bet:<bet_id>", delta payout - amount, derived
# there rather than sent twice), both ON CONFLICT DO NOTHING. COPY because binding arrays
# to ``unnest`` costs the client an isinstance() against collections.abc per element.
_STAGE = "stakepro_outbox_bets"
_STAGE_COLUMNS = ("bet_id", "user_id", "pair_id", "currency", "amount", "payout", "roll",
                  "target", "direction", "nonce", "multiplier", "server_seed_hash",
                  "client_seed", "balance_after", "ts")
_BEGIN_SQL = f"""
BEGIN;
SET LOCAL client_min_messages = warning;
CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (
    bet_id text, user_id bigint, pair_id bigint, currency text, amount bigint,
    payout bigint, roll integer, target integer, direction text, nonce bigint,
    multiplier integer, server_seed_hash text, client_seed text, balance_after bigint,
    ts bigint
) ON COMMIT DELETE ROWS
"""
_BETS_SQL = f"""
WITH bets_in AS (
    INSERT INTO bets (bet_id, user_id, pair_id, currency, amount, payout, roll, target,
                      direction, nonce, multiplier, server_seed_hash, client_seed,
                      balance_after, created_at)
    SELECT bet_id, user_id, pair_id, currency, amount, payout, roll, target, direction,
           nonce, multiplier, server_seed_hash, client_seed, balance_after,
           to_timestamp(ts / 1000.0)
    FROM {_STAGE}
    ON CONFLICT (bet_id) DO NOTHING
)
INSERT INTO ledger (entry_id, user_id, currency, delta, kind, created_at)
SELECT 'bet:' || bet_id, user_id, currency, payout - amount, 'bet', to_timestamp(ts / 1000.0)
FROM {_STAGE}
ON CONFLICT (entry_id) DO NOTHING
"""

_LEDGER_SQL = """
INSERT INTO ledger (entry_id, user_id, currency, delta, kind, created_at)
SELECT entry_id, user_id, currency, delta, kind, to_timestamp(ts / 1000.0)
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::bigint[])
     AS x(entry_id, user_id, currency, delta, kind, ts)
ON CONFLICT (entry_id) DO NOTHING
"""

_REVEALS_SQL = """
UPDATE seed_pairs AS s
SET revealed_at = COALESCE(s.revealed_at, to_timestamp(x.ts / 1000.0)),
    -- Redis's count can be behind the bets already stored if Redis lost writes (its pairs
    -- are then rotated, see lua/bet-5.lua EPOCH): the final nonce is the highest known.
    final_nonce = GREATEST(x.n, COALESCE(s.final_nonce, 0),
                           (SELECT COALESCE(max(b.nonce), 0) FROM bets b
                            WHERE b.pair_id = x.pair_id))
FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS x(pair_id, n, ts)
WHERE s.pair_id = x.pair_id
"""


@dataclass(slots=True)
class Rows:
    """One batch: bet rows (columns of ``unnest``), deposit ledger rows, reveals."""

    bets: list[BetRow] = field(default_factory=list)
    ledger: list[list[Any]] = field(default_factory=lambda: [[] for _ in range(6)])
    reveals: dict[int, tuple[int, int]] = field(default_factory=dict)

    def add(self, event: Event | BetRow) -> None:
        if isinstance(event, tuple):
            self.bets.append(event)
        elif isinstance(event, BetEvent):
            self.bets.append(_row(event))
        elif isinstance(event, DepositEvent):
            for column, value in zip(
                self.ledger,
                (f"dep:{event.key}", event.user_id, event.currency, event.amount, "deposit",
                 event.ts),
                strict=True,
            ):
                column.append(value)
        else:
            # One pair is revealed once; a duplicate (replayed entry) carries the same values.
            # UPDATE ... FROM with two source rows for one target would pick one at random.
            self.reveals[event.pair_id] = (event.final_nonce, event.ts)


async def write(pool: asyncpg.Pool, events: Iterable[Event | BetRow]) -> None:
    """Write events (or bet rows, :func:`bet_row`) in ONE transaction, one statement per kind.

    Idempotent: every row is keyed by its event, so writing the same events again inserts
    nothing (ON CONFLICT DO NOTHING; the reveal keeps the first ``revealed_at``).
    """
    rows = Rows()
    for event in events:
        rows.add(event)
    if not rows.bets and not rows.ledger[0] and not rows.reveals:
        return
    async with pool.acquire() as conn:
        # BEGIN and the staging table in one round trip (a simple query may hold several
        # statements); asyncpg's conn.transaction() would send BEGIN on its own.
        await conn.execute(_BEGIN_SQL)
        try:
            if rows.bets:
                await conn.copy_records_to_table(_STAGE, records=rows.bets,
                                                 columns=_STAGE_COLUMNS)
                await conn.execute(_BETS_SQL)
            if rows.ledger[0]:
                await conn.execute(_LEDGER_SQL, *rows.ledger)
            if rows.reveals:
                pids = sorted(rows.reveals)  # one lock order for concurrent writers
                await conn.execute(
                    _REVEALS_SQL, pids, [rows.reveals[p][0] for p in pids],
                    [rows.reveals[p][1] for p in pids],
                )
            faults.point("persist_before_commit")  # crash tests (workers/faults.py)
        except BaseException:
            if not conn.is_closed() and conn.is_in_transaction():
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")


def _is_data_error(exc: BaseException) -> bool:
    """PostgreSQL refused the data itself (class 22 data exception, 23 constraint)."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(exc, asyncpg.PostgresError) and isinstance(state, str) and (
        state.startswith("22") or state.startswith("23")
    )


# -- the stream side -------------------------------------------------------------------------


async def ensure_groups(redis: aioredis.Redis, keys: Keys, group: str = GROUP) -> None:
    """Create the consumer group on every bucket stream (and the stream), once.

    The group starts at id 0 so that events appended before it existed are persisted too.
    """
    pipe = redis.pipeline(transaction=False)
    for stream in keys.all_outboxes():
        pipe.xgroup_create(stream, group, id="0", mkstream=True)
    for result in await pipe.execute(raise_on_error=False):
        if isinstance(result, ResponseError) and "BUSYGROUP" in str(result):
            continue
        if isinstance(result, Exception):
            raise result


def _entries(reply: Any) -> list[Entry]:
    """XREADGROUP reply -> entries. Raw RESP2 (what :func:`_read` gets) is ``[[stream,
    [[id, [field, value, ...]], ...]], ...]``; RESP3 a map ``{stream: messages}``; redis-py's
    parsed forms give each message's fields as a dict, sometimes wrapped in one more list."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    out: list[Entry] = []
    for stream, messages in items:
        if not messages:
            continue
        first = messages[0]
        if isinstance(first, list) and first and isinstance(first[0], list | tuple):
            messages = first
        name = _b(stream)
        for message_id, fields in messages:
            if type(fields) is list:
                pairs = iter(fields)
                fields = dict(zip(pairs, pairs, strict=False))
            out.append(_new_entry(Entry, (name, message_id if type(message_id) is bytes
                                          else _b(message_id), fields or None)))
    return out


#: Entry(...) without the Python-level __new__ of a NamedTuple (one entry per bet).
_new_entry: Any = tuple.__new__


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


async def _read(
    redis: aioredis.Redis, keys: Keys, consumer: str, count: int, block_ms: int, group: str,
    start: str,
) -> list[Entry]:
    # One XREADGROUP over every bucket stream: all of them live on one Redis here. On a Redis
    # Cluster the streams hash to different slots and a multi-key XREADGROUP is refused
    # (CROSSSLOT); it becomes one call per stream (grouped per node, e.g. by pipeline).
    streams = keys.all_outboxes()
    args: list[Any] = [b"XREADGROUP", b"GROUP", group, consumer, b"COUNT", count]
    if block_ms > 0 and start == ">":
        args += (b"BLOCK", block_ms)
    # The command name as bytes: redis-py then applies no response callback (its callbacks
    # are keyed by str names) and hands back the raw reply, which _entries reads in one
    # pass instead of redis-py's three (a fifth of the worker's CPU per entry).
    reply = await redis.execute_command(  # type: ignore[no-untyped-call]
        *args, b"STREAMS", *streams, *[start] * len(streams))
    return _entries(reply)


async def _dead_letter(redis: aioredis.Redis, keys: Keys, entry: Entry, reason: str) -> None:
    log.error("outbox_dead_letter", stream=entry.stream.decode(), id=entry.id.decode(),
              reason=reason)
    fields: dict[bytes | str, bytes | str] = {
        "stream": entry.stream, "id": entry.id, "reason": reason[:1000]
    }
    for name, value in (entry.fields or {}).items():
        fields[b"f:" + _b(name)] = value
    await redis.xadd(dead_letter_key(keys), fields)  # type: ignore[arg-type]


ACK_ACCRUE = Script.load("outbox-ack-accrue-n.lua")


#: A persisted bet whose entry's ack accrues ``amount * bps // MAX_BPS`` per share:
#: (entry id, amount, shares). A plain tuple: one is made per bet.
_Accruing = tuple[bytes, int, commissions.Shares]


def _bucket_of_stream(keys: Keys, stream: bytes) -> int:
    """The bucket of an outbox stream key (its hash tag ``{bN}``)."""
    tag = stream.rpartition(b"{b")[2].partition(b"}")[0]
    if not tag.isdigit() or keys.outbox(int(tag)).encode() != stream:
        raise ValueError(f"not an outbox stream of {keys.prefix}: {stream!r}")
    return int(tag)


def _ack_call(keys: Keys, group: str, consumer: str,
              todo: Mapping[bytes, tuple[list[_Accruing], list[bytes]]]) -> commissions.Call:
    """One outbox-ack-accrue call for every stream of ``todo``, three arguments per stream
    (not one per entry: redis-py packs arguments one by one, in Python): the ids joined by
    spaces, and the commission sums as one msgpack array."""
    call_keys: list[str] = []
    args: list[Any] = [group, consumer]
    for stream, (accruing, others) in todo.items():
        total: dict[str, int] = {}
        for _, stake, shares in accruing:
            for name, bps in shares:
                if amount := stake * bps // MAX_BPS:
                    total[name] = total.get(name, 0) + amount
        call_keys += (stream.decode(), keys.commission_pending(_bucket_of_stream(keys, stream)))
        amounts: list[str] = []
        for name, amount in total.items():
            amounts += (name, str(amount))
        args += (b" ".join([a[0] for a in accruing]), b" ".join(others),
                 msgpack.packb(amounts) if amounts else b"")
    return (ACK_ACCRUE, call_keys, args)


async def _ack(
    redis: aioredis.Redis, keys: Keys, group: str, consumer: str,
    accruing: Mapping[bytes, list[_Accruing]], others: Mapping[bytes, list[bytes]],
) -> int:
    """XACK + XDEL the entries and accrue their bets' commissions, in ONE atomic script call
    for every stream of the batch (lua/outbox-ack-accrue-n.lua). Returns the bets
    accrued.

    A bet's commissions are accrued in the same atomic call that acknowledges its entry, so
    a replayed entry (crash after COMMIT, a retried job) accrues them only when it is
    finally acknowledged, once. If another consumer acknowledged some of the entries
    meanwhile, the call changes nothing and is made again without them.
    """
    todo = {stream: (accruing.get(stream, []), others.get(stream, []))
            for stream in sorted({*accruing, *others})}
    accrued = 0
    while todo:
        reply = (await commissions.run_scripts(redis, [_ack_call(keys, group, consumer,
                                                                 todo)]))[0]
        if int(reply[0]) == 1:
            accrued = sum(len(bets) for bets, _ in todo.values())
            break
        again: dict[bytes, tuple[list[_Accruing], list[bytes]]] = {}
        for (stream, (bets, rest)), still in zip(todo.items(), reply[1:], strict=True):
            pending = set(bytes(still).split())
            if len(pending) < len(bets):
                log.warning("outbox_acked_elsewhere", stream=stream.decode(),
                            entries=len(bets) - len(pending))
            again[stream] = ([b for b in bets if b[0] in pending], rest)
        todo = again
    commissions.STATS.accrued += accrued
    return accrued


async def handle(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, entries: Sequence[Entry],
    group: str = GROUP, consumer: str = "persist",
) -> int:
    """Persist ``entries`` (already read into this consumer's pending list), then ack them.

    Raises on infrastructure errors (PostgreSQL or Redis unreachable): then nothing is
    acknowledged and the entries stay pending for a retry. Returns the number handled.
    """
    if not entries:
        return 0
    bets: list[tuple[Entry, BetRow]] = []
    rest: list[tuple[Entry, Event]] = []  # deposits, reveals
    dead: list[tuple[Entry, str]] = []
    others: dict[bytes, list[bytes]] = {}  # entries to ack that accrue nothing
    for entry in entries:
        fields = entry.fields
        if fields is None:  # deleted from the stream while pending: nothing left to write
            others.setdefault(entry.stream, []).append(entry.id)
            continue
        try:
            if fields.get(b"k") == b"bet":
                bets.append((entry, bet_row(fields)))
            else:
                rest.append((entry, parse(fields)))
        except Malformed as exc:
            dead.append((entry, str(exc)))
    try:
        await write(pool, [*(row for _, row in bets), *(event for _, event in rest)])
    except Exception as exc:
        if not _is_data_error(exc):
            raise
        # One entry PostgreSQL refuses must not hold back the others: find it, one at a time.
        log.warning("outbox_batch_refused", error=str(exc), size=len(bets) + len(rest))
        kept: list[tuple[Entry, Any]] = []
        for entry, event in [*bets, *rest]:
            try:
                await write(pool, (event,))
                kept.append((entry, event))
            except Exception as one:
                if not _is_data_error(one):
                    raise
                dead.append((entry, f"{type(one).__name__}: {one}"))
        bets = [(entry, event) for entry, event in kept if isinstance(event, tuple)]
        rest = [(entry, event) for entry, event in kept if not isinstance(event, tuple)]
    # Commissions of the bets now in PostgreSQL, accrued by the ack itself (below).
    accruing: dict[bytes, list[_Accruing]] = {}
    if bets:
        shares = await commissions.shares_of(pool, {(row[1], row[3]) for _, row in bets})
        for entry, row in bets:
            mine = shares[(row[1], row[3])]
            if mine:
                accruing.setdefault(entry.stream, []).append((entry.id, row[4], mine))
            else:
                others.setdefault(entry.stream, []).append(entry.id)
    for entry, _ in rest:
        others.setdefault(entry.stream, []).append(entry.id)
    for entry, reason in dead:
        await _dead_letter(redis, keys, entry, reason)
        others.setdefault(entry.stream, []).append(entry.id)
    # Only now, after COMMIT (and after the dead letters were written): ack and delete.
    faults.point("persist_after_commit")  # crash tests (workers/faults.py)
    await _ack(redis, keys, group, consumer, accruing, others)
    return len(entries)


async def drain_once(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, consumer: str, count: int = 1000,
    block_ms: int = 100, group: str = GROUP, pending: bool = False,
) -> int:
    """Read one batch from every bucket stream, persist it in one transaction, ack it.

    ``count`` is per stream (Redis COUNT semantics): one batch holds at most
    ``count * keys.buckets`` entries. ``block_ms`` <= 0 does not block. With ``pending`` it
    re-reads this consumer's own unacknowledged entries (at start, after a failed attempt)
    instead of new ones; loop until it returns 0. Returns the number of entries handled.
    """
    entries = await _read(redis, keys, consumer, count, block_ms, group,
                          "0" if pending else ">")
    return await handle(redis, pool, keys, entries, group, consumer)


async def reclaim(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, consumer: str, count: int = 1000,
    min_idle_ms: int = RECLAIM_IDLE_MS, group: str = GROUP,
) -> int:
    """Take over entries pending longer than ``min_idle_ms`` on any consumer and persist them.

    XAUTOCLAIM per stream, the first page of every stream in one pipeline. Cheap but not free
    (one command per bucket): call it every few seconds, not every batch.
    """
    handled = 0
    cursors = dict.fromkeys(keys.all_outboxes(), "0-0")
    while cursors:
        pipe = redis.pipeline(transaction=False)
        for stream, cursor in cursors.items():
            pipe.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=count)
        replies = await pipe.execute()
        entries: list[Entry] = []
        following: dict[str, str] = {}
        for stream, reply in zip(cursors, replies, strict=True):
            cursor, messages = reply[0], reply[1]
            for message_id, fields in messages:
                entries.append(Entry(_b(stream), _b(message_id), fields or None))
            if _b(cursor) != b"0-0":
                following[stream] = cursor.decode() if isinstance(cursor, bytes) else cursor
        if entries:
            log.warning("outbox_reclaimed", count=len(entries), consumer=consumer)
        handled += await handle(redis, pool, keys, entries, group, consumer)
        cursors = following
    return handled


async def pending_count(redis: aioredis.Redis, keys: Keys) -> int:
    """Entries not yet persisted, over every bucket stream (acknowledged ones are deleted)."""
    pipe = redis.pipeline(transaction=False)
    for stream in keys.all_outboxes():
        pipe.xlen(stream)
    return sum(int(n) for n in await pipe.execute())


async def dead_count(redis: aioredis.Redis, keys: Keys) -> int:
    """Entries set aside as unpersistable (each one needs a person)."""
    return int(await redis.xlen(dead_letter_key(keys)))


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds to wait after ``attempt`` consecutive failures (exponential, capped)."""
    return min(cap, base * math.pow(2, max(0, attempt - 1)))
