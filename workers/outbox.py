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

    XADD (Lua) -> XREADGROUP ">" -> one PostgreSQL transaction -> COMMIT -> XACK + XDEL

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

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgpack
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from server.keys import Keys
from workers import commissions, faults

log = structlog.get_logger(__name__)

GROUP = "persist"
#: Entries pending longer than this on some consumer are presumed orphaned by a dead process.
RECLAIM_IDLE_MS = 30_000

_I64 = (-(2**63), 2**63 - 1)
_I32 = (-(2**31), 2**31 - 1)


class Malformed(ValueError):
    """An outbox entry that cannot be turned into rows."""


@dataclass(frozen=True, slots=True)
class Entry:
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


# -- writing ---------------------------------------------------------------------------------

_BETS_SQL = """
INSERT INTO bets (bet_id, user_id, pair_id, currency, amount, payout, roll, target, direction,
                  nonce, multiplier, server_seed_hash, client_seed, balance_after, created_at)
SELECT bet_id, user_id, pair_id, currency, amount, payout, roll, target, direction,
       nonce, multiplier, server_seed_hash, client_seed, balance_after,
       to_timestamp(ts / 1000.0)
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::bigint[],
            $7::integer[], $8::integer[], $9::text[], $10::bigint[], $11::integer[],
            $12::text[], $13::text[], $14::bigint[], $15::bigint[])
     AS x(bet_id, user_id, pair_id, currency, amount, payout, roll, target, direction,
          nonce, multiplier, server_seed_hash, client_seed, balance_after, ts)
ON CONFLICT (bet_id) DO NOTHING
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
    """Column arrays of one batch, one list per column (what ``unnest`` takes)."""

    bets: list[list[Any]] = field(default_factory=lambda: [[] for _ in range(15)])
    ledger: list[list[Any]] = field(default_factory=lambda: [[] for _ in range(6)])
    reveals: dict[int, tuple[int, int]] = field(default_factory=dict)

    def add(self, event: Event) -> None:
        if isinstance(event, BetEvent):
            e = event
            for column, value in zip(
                self.bets,
                (e.bet_id, e.user_id, e.pair_id, e.currency, e.amount, e.payout, e.roll,
                 e.target, e.direction, e.nonce, e.multiplier, e.server_seed_hash,
                 e.client_seed, e.balance_after, e.ts),
                strict=True,
            ):
                column.append(value)
            self._ledger(f"bet:{e.bet_id}", e.user_id, e.currency, e.payout - e.amount, "bet",
                         e.ts)
        elif isinstance(event, DepositEvent):
            self._ledger(f"dep:{event.key}", event.user_id, event.currency, event.amount,
                         "deposit", event.ts)
        else:
            # One pair is revealed once; a duplicate (replayed entry) carries the same values.
            # UPDATE ... FROM with two source rows for one target would pick one at random.
            self.reveals[event.pair_id] = (event.final_nonce, event.ts)

    def _ledger(self, entry_id: str, user_id: int, currency: str, delta: int, kind: str,
                ts: int) -> None:
        for column, value in zip(self.ledger, (entry_id, user_id, currency, delta, kind, ts),
                                 strict=True):
            column.append(value)


async def write(pool: asyncpg.Pool, events: Iterable[Event]) -> None:
    """Write events in ONE transaction, one statement (one round trip) per table.

    Idempotent: every row is keyed by its event, so writing the same events again inserts
    nothing (ON CONFLICT DO NOTHING; the reveal keeps the first ``revealed_at``).
    """
    rows = Rows()
    for event in events:
        rows.add(event)
    if not rows.bets[0] and not rows.ledger[0] and not rows.reveals:
        return
    async with pool.acquire() as conn, conn.transaction():
        if rows.bets[0]:
            await conn.execute(_BETS_SQL, *rows.bets)
        if rows.ledger[0]:
            await conn.execute(_LEDGER_SQL, *rows.ledger)
        if rows.reveals:
            pids = sorted(rows.reveals)  # one lock order for concurrent writers
            await conn.execute(
                _REVEALS_SQL, pids, [rows.reveals[p][0] for p in pids],
                [rows.reveals[p][1] for p in pids],
            )
        faults.point("persist_before_commit")  # crash tests (workers/faults.py)


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
    """XREADGROUP reply -> entries. RESP2 gives ``[[stream, messages], ...]``; RESP3 (and
    redis-py's unified form) a map ``{stream: messages}``, sometimes wrapped in one list."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    out: list[Entry] = []
    for stream, messages in items:
        if messages and isinstance(messages[0], list):
            messages = messages[0]
        for message_id, fields in messages or ():
            out.append(Entry(_b(stream), _b(message_id), fields or None))
    return out


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


async def _read(
    redis: aioredis.Redis, keys: Keys, consumer: str, count: int, block_ms: int, group: str,
    start: str,
) -> list[Entry]:
    # One XREADGROUP over every bucket stream: all of them live on one Redis here. On a Redis
    # Cluster the streams hash to different slots and a multi-key XREADGROUP is refused
    # (CROSSSLOT); it becomes one call per stream (grouped per node, e.g. by pipeline).
    reply = await redis.xreadgroup(
        group, consumer, dict.fromkeys(keys.all_outboxes(), start), count=count,
        block=block_ms if block_ms > 0 and start == ">" else None,
    )
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


async def _ack(
    redis: aioredis.Redis, entries: Sequence[Entry], group: str,
    markers: Sequence[str] = (),
) -> None:
    """XACK + XDEL the entries, then drop the commission markers of their bets.

    A marker only guards the moment between the accrual and this ack (a crash there
    replays the entry); once the entry is acknowledged it cannot come back, so the marker
    is deleted rather than left to its TTL (one key per bet would otherwise pile up). The
    pipeline keeps this order: a crash part-way leaves at worst a marker that expires.
    """
    by_stream: dict[bytes, list[bytes]] = {}
    for entry in entries:
        by_stream.setdefault(entry.stream, []).append(entry.id)
    pipe = redis.pipeline(transaction=False)
    for stream, ids in by_stream.items():
        pipe.xack(stream, group, *ids)
        pipe.xdel(stream, *ids)
    for marker in markers:
        pipe.delete(marker)
    await pipe.execute()


async def handle(
    redis: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, entries: Sequence[Entry],
    group: str = GROUP,
) -> int:
    """Persist ``entries`` (already read into this consumer's pending list), then ack them.

    Raises on infrastructure errors (PostgreSQL or Redis unreachable): then nothing is
    acknowledged and the entries stay pending for a retry. Returns the number handled.
    """
    if not entries:
        return 0
    good: list[tuple[Entry, Event]] = []
    dead: list[tuple[Entry, str]] = []
    for entry in entries:
        if entry.fields is None:
            continue  # deleted from the stream while pending: nothing left to write
        try:
            good.append((entry, parse(entry.fields)))
        except Malformed as exc:
            dead.append((entry, str(exc)))
    try:
        await write(pool, (event for _, event in good))
    except Exception as exc:
        if not _is_data_error(exc):
            raise
        # One entry PostgreSQL refuses must not hold back the others: find it, one at a time.
        log.warning("outbox_batch_refused", error=str(exc), size=len(good))
        for entry, event in good:
            try:
                await write(pool, (event,))
            except Exception as one:
                if not _is_data_error(one):
                    raise
                dead.append((entry, f"{type(one).__name__}: {one}"))
    # Commissions of the bets now in PostgreSQL, before the ack: a crash before the ack
    # replays the batch, and the accrual's per-bet marker makes the replay pay nothing.
    refused = {(entry.stream, entry.id) for entry, _ in dead}
    accrued = [
        event for entry, event in good
        if isinstance(event, BetEvent) and (entry.stream, entry.id) not in refused
    ]
    await commissions.accrue(redis, pool, keys, accrued)
    for entry, reason in dead:
        await _dead_letter(redis, keys, entry, reason)
    # Only now, after COMMIT (and after the dead letters were written): ack and delete.
    faults.point("persist_after_commit")  # crash tests (workers/faults.py)
    await _ack(
        redis, entries, group,
        [keys.commission_done(event.user_id, event.bet_id) for event in accrued],
    )
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
    return await handle(redis, pool, keys, entries, group)


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
        handled += await handle(redis, pool, keys, entries, group)
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
