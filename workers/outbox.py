"""Outbox -> PostgreSQL: drain the bucket streams the Lua scripts append to.

Every settled bet, credited deposit and revealed seed pair is written by its Lua script into
the outbox stream of the user's bucket (``keys.outbox(b)``), in the same atomic call that
moved the money. This module moves those events into PostgreSQL, at least once and
idempotently (every row has a key derived from the event: ``bet_id``, ``bet:<bet_id>``,
``dep:<key>``, the pair id), so a crash anywhere only ever causes a replay that inserts
nothing twice.

The functions are plain coroutines over a :data:`plumbing.redisclient.Client` (one Redis or
a Redis Cluster; bytes replies, not ``decode_responses``), an asyncpg pool and
:class:`plumbing.keys.Keys`, so the in-process loop (:mod:`workers.persister`) and the
Dramatiq actors can share them. The entries' format is
:mod:`plumbing.events`, which decodes them (:func:`~plumbing.events.bet_row`,
:func:`~plumbing.events.parse`); each bet row records its player's commission chain
(:func:`workers.commissions.chain_columns`), which the commission flush pays from.

Life of an entry, per consumer group (``persist``)::

    XADD (Lua) -> XREADGROUP ">" -> one PostgreSQL transaction -> COMMIT
               -> XACK + XDEL, one atomic script for the batch

The cost is per batch where it can be (bench/drainbench.py measures it): one XREADGROUP
over every stream, COPY into a staging table and one INSERT for the bets and their ledger
rows, one script call for the ack; per bet only the decoding (``bet_row``) is Python.

On a Redis Cluster every bucket stream hashes to a slot of its own, and a command or a
script over keys of two slots is refused (CROSSSLOT). There the read is one XREADGROUP per
stream and the ack one script call per stream, each sent in one pipeline (redis-py sends
each master its part at once); Redis cannot block on several slots in one command, so an
empty read is repeated every :data:`CLUSTER_POLL_S` until ``block_ms`` has passed. On one
Redis the single multi-stream calls stay: they are what the figures of docs/benchmarks.md
were measured with.

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
  is copied into the dead-letter stream ``keys.outbox_dead()`` with the reason, then
  acknowledged: it never blocks the stream, and it is never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import asyncpg
import structlog
from redis.exceptions import ResponseError

from plumbing import scripts
from plumbing.events import (
    BET_COLUMNS,
    BetEvent,
    BetRow,
    DepositEvent,
    Event,
    Malformed,
    bet_row,
    parse,
    row_of,
)
from plumbing.keys import Keys
from plumbing.redisclient import Client, is_cluster
from workers import commissions, faults

log = structlog.get_logger(__name__)

GROUP = "persist"
#: Entries pending longer than this on some consumer are presumed orphaned by a dead process.
RECLAIM_IDLE_MS = 30_000
#: On a Redis Cluster, how long an empty read waits before it reads again (no command can
#: block on the streams of several slots): at most this much persistence lag is added.
CLUSTER_POLL_S = 0.05

class Entry(NamedTuple):
    """One stream entry as read: the stream it came from, its id, its raw fields."""

    stream: bytes
    id: bytes
    fields: Mapping[bytes, bytes] | None  # None: deleted while pending


# -- writing ---------------------------------------------------------------------------------

# Bets go to PostgreSQL by COPY into a session-local staging table, then one statement
# inserts them and their ledger rows (entry "bet:<bet_id>", delta payout - amount, derived
# there rather than sent twice), both ON CONFLICT DO NOTHING. COPY because binding arrays
# to ``unnest`` costs the client an isinstance() against collections.abc per element. The
# commission chains travel once per player, not per bet (workers.commissions.chain_columns),
# and are joined to the bets in SQL: only the insert that creates a row records its chain.
_STAGE = "stakepro_outbox_bets"
_BEGIN_SQL = f"""
BEGIN;
SET LOCAL client_min_messages = warning;
CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (
    bet_id text, user_id bigint, pair_id bigint, currency text, amount bigint,
    payout bigint, roll integer, target integer, direction text, nonce bigint,
    multiplier integer, server_seed_hash text, client_seed text, balance_after bigint,
    ts bigint, client_id text
) ON COMMIT DELETE ROWS
"""
_BETS_SQL = f"""
WITH chains AS (
    SELECT player, array_agg(ancestor ORDER BY place) AS ancestors,
           array_agg(bps ORDER BY place) AS rates
    FROM unnest($1::bigint[], $2::bigint[], $3::integer[], $4::integer[])
         AS c(player, ancestor, bps, place)
    GROUP BY player
), bets_in AS (
    INSERT INTO bets (bet_id, user_id, pair_id, currency, amount, payout, roll, target,
                      direction, nonce, multiplier, server_seed_hash, client_seed,
                      balance_after, created_at, commission_to, commission_bps, client_id)
    SELECT s.bet_id, s.user_id, s.pair_id, s.currency, s.amount, s.payout, s.roll, s.target,
           s.direction, s.nonce, s.multiplier, s.server_seed_hash, s.client_seed,
           s.balance_after, to_timestamp(s.ts / 1000.0), c.ancestors, c.rates, s.client_id
    FROM {_STAGE} AS s LEFT JOIN chains AS c ON c.player = s.user_id
    ON CONFLICT (bet_id, created_at) DO NOTHING
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
    -- are then rotated, see lua/bet-n.lua EPOCH): the final nonce is the highest known.
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
            self.bets.append(row_of(event))
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
    nothing (ON CONFLICT DO NOTHING; the reveal keeps the first ``revealed_at``). A new bet
    row records its player's commission chain as it stands now (cached up to
    ``commissions.CHAIN_TTL_S``).
    """
    rows = Rows()
    for event in events:
        rows.add(event)
    if not rows.bets and not rows.ledger[0] and not rows.reveals:
        return
    chains = (await commissions.chain_columns(pool, {row[1] for row in rows.bets})
              if rows.bets else None)
    async with pool.acquire() as conn:
        # BEGIN and the staging table in one round trip (a simple query may hold several
        # statements); asyncpg's conn.transaction() would send BEGIN on its own.
        await conn.execute(_BEGIN_SQL)
        try:
            if rows.bets:
                await conn.copy_records_to_table(_STAGE, records=rows.bets,
                                                 columns=BET_COLUMNS)
                await conn.execute(_BETS_SQL, *chains or ([], [], [], []))
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


async def ensure_groups(redis: Client, keys: Keys, group: str = GROUP) -> None:
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
    redis: Client, keys: Keys, consumer: str, count: int, block_ms: int, group: str,
    start: str,
) -> list[Entry]:
    streams = keys.all_outboxes()
    if is_cluster(redis):
        return await _read_each(redis, streams, consumer, count, block_ms, group, start)
    # One XREADGROUP over every bucket stream: all of them live on this one Redis.
    args: list[Any] = [b"XREADGROUP", b"GROUP", group, consumer, b"COUNT", count]
    if block_ms > 0 and start == ">":
        args += (b"BLOCK", block_ms)
    # The command name as bytes: redis-py then applies no response callback (its callbacks
    # are keyed by str names) and hands back the raw reply, which _entries reads in one
    # pass instead of redis-py's three (docs/benchmarks.md has what they cost).
    reply = await redis.execute_command(
        *args, b"STREAMS", *streams, *[start] * len(streams))
    return _entries(reply)


async def _read_each(
    redis: Client, streams: Sequence[str], consumer: str, count: int, block_ms: int,
    group: str, start: str,
) -> list[Entry]:
    """The cluster's read: one XREADGROUP per stream (each its own slot), all in one
    pipeline, none blocking; an empty answer is asked again every CLUSTER_POLL_S for up to
    ``block_ms`` (a BLOCK in a pipeline would hold the node's later streams behind it)."""
    deadline = time.monotonic() + max(0, block_ms) / 1000
    while True:
        pipe = redis.pipeline(transaction=False)
        for stream in streams:
            # The name as str: the cluster client finds the key by the command's key specs.
            pipe.execute_command("XREADGROUP", "GROUP", group, consumer, "COUNT", count,
                                 "STREAMS", stream, start)
        entries: list[Entry] = []
        for reply in await pipe.execute():
            entries += _entries(reply)
        left = deadline - time.monotonic()
        if entries or start != ">" or left <= 0:
            return entries
        await asyncio.sleep(min(CLUSTER_POLL_S, left))


async def _dead_letter(redis: Client, keys: Keys, entry: Entry, reason: str) -> None:
    log.error("outbox_dead_letter", stream=entry.stream.decode(), id=entry.id.decode(),
              reason=reason)
    fields: dict[bytes | str, bytes | str] = {
        "stream": entry.stream, "id": entry.id, "reason": reason[:1000]
    }
    for name, value in (entry.fields or {}).items():
        fields[b"f:" + _b(name)] = value
    await redis.xadd(keys.outbox_dead(), fields)  # type: ignore[arg-type]


async def _ack(redis: Client, group: str, acks: Mapping[bytes, list[bytes]]) -> int:
    """XACK + XDEL the entries (lua/outbox-ack-n.lua), the ids of a stream joined into one
    argument (redis-py packs arguments one by one, in Python): on one Redis ONE atomic call
    for every stream of the batch, on a cluster one call per stream (its keys must share a
    slot), all in one pipeline. Returns how many were still pending: fewer when another
    consumer acknowledged some first, which changes nothing (no money moves here)."""
    streams = sorted(acks)
    if not streams:
        return 0
    if is_cluster(redis):
        replies = await scripts.run(redis, [
            (scripts.OUTBOX_ACK, [s.decode()], [group, b" ".join(acks[s])]) for s in streams])
        return sum(int(r) for r in replies)
    return int(await scripts.run_one(
        redis, scripts.OUTBOX_ACK, [s.decode() for s in streams],
        [group, *(b" ".join(acks[s]) for s in streams)]))


async def handle(
    redis: Client, pool: asyncpg.Pool, keys: Keys, entries: Sequence[Entry],
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
    others: dict[bytes, list[bytes]] = {}  # stream -> the ids to acknowledge
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
    for entry, _ in bets:
        others.setdefault(entry.stream, []).append(entry.id)
    for entry, _ in rest:
        others.setdefault(entry.stream, []).append(entry.id)
    for entry, reason in dead:
        await _dead_letter(redis, keys, entry, reason)
        others.setdefault(entry.stream, []).append(entry.id)
    # Only now, after COMMIT (and after the dead letters were written): ack and delete.
    faults.point("persist_after_commit")  # crash tests (workers/faults.py)
    await _ack(redis, group, others)
    return len(entries)


async def drain_once(
    redis: Client, pool: asyncpg.Pool, keys: Keys, consumer: str, count: int = 1000,
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
    redis: Client, pool: asyncpg.Pool, keys: Keys, consumer: str, count: int = 1000,
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


async def pending_count(redis: Client, keys: Keys) -> int:
    """Entries not yet persisted, over every bucket stream (acknowledged ones are deleted)."""
    pipe = redis.pipeline(transaction=False)
    for stream in keys.all_outboxes():
        pipe.xlen(stream)
    return sum(int(n) for n in await pipe.execute())


async def dead_count(redis: Client, keys: Keys) -> int:
    """Entries set aside as unpersistable (each one needs a person)."""
    return int(await redis.xlen(keys.outbox_dead()))


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds to wait after ``attempt`` consecutive failures (exponential, capped)."""
    return min(cap, base * math.pow(2, max(0, attempt - 1)))
