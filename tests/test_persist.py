"""Outbox -> PostgreSQL: every settled event lands exactly once, nothing is acked early.

The first tests drive :mod:`workers.outbox` directly on streams of their own key prefix
(the app's persister never sees them); the last ones go through a real socket and the app's
in-process persister.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import asyncpg
import msgpack
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from plumbing import events
from plumbing.keys import Keys
from plumbing.settings import Settings
from tests.helpers import Api, Direct, eventually, minor
from workers import outbox

T = TypeVar("T")




class Env(Direct):
    async def xadd(self, user_id: int, fields: dict[Any, Any]) -> bytes:
        entry_id: Any = await self.redis.xadd(self.keys.outbox_for(user_id), fields)
        return bytes(entry_id)

    async def drain(self, **kw: Any) -> int:
        return await outbox.drain_once(self.redis, self.pool, self.keys, "t", block_ms=0, **kw)

    async def pair(self, user_id: int) -> int:
        return int(await self.pool.fetchval(
            "INSERT INTO seed_pairs (user_id, server_seed, server_seed_hash, client_seed)"
            " VALUES ($1, 'ss', 'sh', 'cs') RETURNING pair_id", user_id))


@pytest_asyncio.fixture
async def env(settings: Settings) -> AsyncIterator[Env]:
    """Streams of a prefix of their own (4 buckets), a pool on the test database."""
    async with Env.on(settings, "p") as env:
        await outbox.ensure_groups(env.redis, env.keys)
        await outbox.ensure_groups(env.redis, env.keys)  # BUSYGROUP is fine
        yield env


def bet(user_id: int, pair_id: int, nonce: int = 1, amount: int = 100, payout: int = 198,
        balance: int = 1098, ts: int = 1_700_000_000_123, **over: Any) -> dict[str, Any]:
    event = {
        "bet_id": f"{pair_id}-{nonce}", "user_id": user_id, "pair_id": pair_id,
        "currency": "USDT", "amount": amount, "payout": payout, "roll": 1234,
        "target": 5000, "direction": "under", "nonce": nonce, "multiplier": 19800,
        "server_seed_hash": "ab" * 32, "client_seed": "seed-1", "ts": ts,
        "client_id": f"s:c{nonce}", **over,
    }
    return {"k": "bet", "e": msgpack.packb(event), "b": str(balance)}


def deposit(user_id: int, key: str, amount: int = 1000, balance: int = 1000) -> dict[str, Any]:
    event = {"key": key, "user_id": user_id, "currency": "USDT", "amount": amount,
             "ts": 1_700_000_000_000}
    return {"k": "deposit", "e": msgpack.packb(event), "b": str(balance)}


async def counts(pool: asyncpg.Pool, user_id: int) -> tuple[int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM bets WHERE user_id = $1) AS bets,"
        " (SELECT count(*) FROM ledger WHERE user_id = $1) AS ledger", user_id)
    assert row is not None
    return int(row["bets"]), int(row["ledger"])


# -- workers.outbox directly -----------------------------------------------------------------


async def test_drain_writes_bets_ledger_and_reveals(env: Env) -> None:
    uid = await env.user()
    pid = await env.pair(uid)
    await env.xadd(uid, deposit(uid, f"k-{uid}"))
    await env.xadd(uid, bet(uid, pid, 1, amount=100, payout=198, balance=1098))
    await env.xadd(uid, bet(uid, pid, 2, amount=300, payout=0, balance=798))
    await env.xadd(uid, {"k": "reveal", "pid": str(pid), "n": "2", "ts": "1700000001000"})
    assert await outbox.pending_count(env.redis, env.keys) == 4

    assert await env.drain() == 4
    assert await outbox.pending_count(env.redis, env.keys) == 0  # acked and deleted
    pending = await env.redis.xpending(env.keys.outbox_for(uid), outbox.GROUP)
    assert pending["pending"] == 0

    row: Any = await env.pool.fetchrow("SELECT * FROM bets WHERE bet_id = $1", f"{pid}-1")
    assert row is not None
    assert dict(row) | {"created_at": None} == {
        "bet_id": f"{pid}-1", "user_id": uid, "pair_id": pid, "currency": "USDT",
        "amount": 100, "payout": 198, "roll": 1234, "target": 5000, "direction": "under",
        "nonce": 1, "multiplier": 19800, "server_seed_hash": "ab" * 32,
        "client_seed": "seed-1", "balance_after": 1098, "created_at": None,
        # A player without ancestors owes no commission (workers/commissions.py).
        "commission_to": None, "commission_bps": None, "commission_flush": None,
        "client_id": "s:c1",
    }
    assert row["created_at"].timestamp() == pytest.approx(1_700_000_000.123, abs=1e-6)
    ledger = {r["entry_id"]: (r["delta"], r["kind"]) for r in await env.pool.fetch(
        "SELECT entry_id, delta, kind FROM ledger WHERE user_id = $1", uid)}
    assert ledger == {f"dep:k-{uid}": (1000, "deposit"), f"bet:{pid}-1": (98, "bet"),
                      f"bet:{pid}-2": (-300, "bet")}
    seed: Any = await env.pool.fetchrow(
        "SELECT revealed_at, final_nonce FROM seed_pairs WHERE pair_id = $1", pid)
    assert seed is not None and seed["final_nonce"] == 2
    assert seed["revealed_at"].timestamp() == pytest.approx(1_700_000_001.0)
    assert await env.drain() == 0


async def test_replayed_entries_insert_nothing_twice(env: Env) -> None:
    uid = await env.user()
    pid = await env.pair(uid)
    entries = [deposit(uid, f"k-{uid}"), bet(uid, pid, 1), bet(uid, pid, 2, payout=0),
               {"k": "reveal", "pid": str(pid), "n": "2", "ts": "1700000001000"}]
    for fields in entries:
        await env.xadd(uid, fields)
    assert await env.drain() == 4
    assert await counts(env.pool, uid) == (2, 3)
    first = await env.pool.fetchval(
        "SELECT revealed_at FROM seed_pairs WHERE pair_id = $1", pid)

    # The same events again (a worker that crashed after COMMIT, before XACK), twice in one
    # batch even, and with a later reveal time: nothing new, the first reveal time stays.
    for fields in [*entries, *entries[:3]]:
        await env.xadd(uid, fields)
    await env.xadd(uid, {"k": "reveal", "pid": str(pid), "n": "2", "ts": "1800000000000"})
    assert await env.drain() == 8
    assert await counts(env.pool, uid) == (2, 3)
    assert await env.pool.fetchval(
        "SELECT revealed_at FROM seed_pairs WHERE pair_id = $1", pid) == first

    # And write() itself, twice with one batch.
    decoded = [events.parse({k.encode(): v if isinstance(v, bytes) else v.encode()
                             for k, v in f.items()}) for f in entries]
    await outbox.write(env.pool, decoded)
    await outbox.write(env.pool, decoded + decoded)
    assert await counts(env.pool, uid) == (2, 3)
    total = await env.pool.fetchval("SELECT sum(delta) FROM ledger WHERE user_id = $1", uid)
    assert total == 1000 + 98 - 100


async def test_list_shaped_bet_events_are_read_like_maps(env: Env) -> None:
    """The event blob may be the map the server writes today or the list BET_FIELDS."""
    uid = await env.user()
    pid = await env.pair(uid)
    as_map = bet(uid, pid, 1)
    event = msgpack.unpackb(bet(uid, pid, 2)["e"])
    as_list = {**as_map, "e": msgpack.packb([event[name] for name in events.BET_FIELDS])}
    await env.xadd(uid, as_map)
    await env.xadd(uid, as_list)
    assert await env.drain() == 2
    assert await counts(env.pool, uid) == (2, 2)
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in as_list.items()}
    assert events.bet_row(fields) == events.row_of(events.parse(fields))  # type: ignore[arg-type]


#: Changes to a good bet entry, and whether the decoders must accept them (the scripts write
#: integers as msgpack integers and strings as msgpack strings in the blob, and the balance
#: as decimal digits in ``b``).
DECODER_CASES: list[tuple[dict[str, Any], bool]] = [
    ({}, True), ({"amount": 1, "payout": 0}, True), ({"nonce": 2**63 - 1}, True),
    ({"roll": 2**31 - 1, "target": -(2**31)}, True), ({"balance": 0}, True),
    ({"balance": 2**63 - 1}, True), ({"direction": "over"}, True),
    ({"amount": True}, False), ({"amount": 0}, False), ({"payout": -1}, False),
    ({"roll": 2**31}, False), ({"nonce": 2**63}, False), ({"balance": -5}, False),
    ({"balance": 2**63}, False), ({"direction": "sideways"}, False), ({"bet_id": ""}, False),
    ({"currency": b"USDT"}, False), ({"client_seed": None}, False), ({"amount": "100"}, False),
    ({"nonce": "7"}, False), ({"ts": 1.5}, False), ({"target": b"5000"}, False),
    ({"client_id": None}, True), ({"client_id": "i:-12"}, True), ({"client_id": "x"}, False),
    ({"client_id": 5}, False), ({"client_id": "s:" + "x" * 65}, False),
]


@pytest.mark.parametrize(("over", "accepted"), DECODER_CASES)
def test_the_fast_and_slow_decoders_give_the_expected_answer(
    over: dict[str, Any], accepted: bool
) -> None:
    """bet_row() and parse() both accept exactly the good entries, with the values written."""
    entry = bet(7, 9, **over)
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in entry.items()}
    slow: Any
    fast: Any
    try:
        slow = events.row_of(events.parse(fields))  # type: ignore[arg-type]
    except events.Malformed:
        slow = events.Malformed
    try:
        fast = events.bet_row(fields)
    except events.Malformed:
        fast = events.Malformed
    if not accepted:
        assert slow is fast is events.Malformed
        return
    written = {**msgpack.unpackb(entry["e"]), "balance_after": int(entry["b"])}
    assert slow == fast == tuple(written[name] for name in events.BET_COLUMNS)


async def test_malformed_entries_go_to_the_dead_letter_stream(env: Env) -> None:
    uid = await env.user()
    pid = await env.pair(uid)
    await env.xadd(uid, {"k": "bet", "e": b"\xc1not msgpack", "b": "1"})
    await env.xadd(uid, {"k": "what"})
    await env.xadd(uid, bet(uid, pid, 1, direction="sideways"))
    await env.xadd(uid, bet(uid, pid, 2))
    # Valid to Python, refused by PostgreSQL (NUL in text): isolated, the rest still lands.
    await env.xadd(uid, bet(uid, pid, 3, currency="US\x00DT"))
    await env.xadd(uid, bet(uid, pid, 4))

    assert await env.drain() == 6
    assert await outbox.pending_count(env.redis, env.keys) == 0
    assert await counts(env.pool, uid) == (2, 2)
    dead: Any = await env.redis.xrange(env.keys.outbox_dead())
    assert len(dead) == 4 == await outbox.dead_count(env.redis, env.keys)
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert "not msgpack" in reasons[0] and "unknown kind" in reasons[1]
    assert "direction" in reasons[2]
    # Kept whole for a person: the original fields and where they came from.
    last = dead[3][1]
    assert last[b"stream"] == env.keys.outbox_for(uid).encode()
    assert msgpack.unpackb(last[b"f:e"])["bet_id"] == f"{pid}-3"


async def test_nothing_is_acked_when_the_write_fails(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = await env.user()
    pid = await env.pair(uid)
    await env.xadd(uid, bet(uid, pid, 1))
    await env.xadd(uid, deposit(uid, f"k-{uid}"))

    async def down(pool: asyncpg.Pool, events: Any) -> None:
        raise ConnectionResetError("PostgreSQL went away")

    monkeypatch.setattr(outbox, "write", down)
    with pytest.raises(ConnectionResetError):
        await env.drain()
    monkeypatch.undo()
    assert await outbox.pending_count(env.redis, env.keys) == 2
    pending = await env.redis.xpending(env.keys.outbox_for(uid), outbox.GROUP)
    assert pending["pending"] == 2
    assert await env.drain() == 0  # ">" does not see them again ...
    assert await env.drain(pending=True) == 2  # ... our own pending list does
    assert await counts(env.pool, uid) == (1, 2)
    assert await outbox.pending_count(env.redis, env.keys) == 0


async def test_entries_of_a_dead_consumer_are_reclaimed(env: Env) -> None:
    uid = await env.user()
    pid = await env.pair(uid)
    for n in range(1, 6):
        await env.xadd(uid, bet(uid, pid, n))
    # A consumer reads them and dies before COMMIT.
    read: Any = await env.redis.xreadgroup(
        outbox.GROUP, "dead", {s: ">" for s in env.keys.all_outboxes()}, count=100)
    assert sum(len(messages) for _, messages in read) == 5
    assert await env.drain() == 0
    # Not yet idle long enough: left alone.
    assert await outbox.reclaim(env.redis, env.pool, env.keys, "alive") == 0
    assert await outbox.reclaim(env.redis, env.pool, env.keys, "alive", count=2,
                                min_idle_ms=0) == 5
    assert await counts(env.pool, uid) == (5, 5)
    assert await outbox.pending_count(env.redis, env.keys) == 0


async def test_persister_close_flushes_what_is_left(env: Env) -> None:
    from workers.persister import Persister

    uid = await env.user()
    pid = await env.pair(uid)
    persister = Persister(env.redis, env.pool, env.keys, "p1", block_ms=50)
    persister.start()
    try:
        await env.xadd(uid, bet(uid, pid, 1))

        async def first_acked() -> bool:  # handled counts after the ack, past COMMIT
            return persister.handled == 1

        await eventually(first_acked)
        assert await counts(env.pool, uid) == (1, 1)
        for n in range(2, 50):
            await env.xadd(uid, bet(uid, pid, n))
    finally:
        await persister.close()
    assert await counts(env.pool, uid) == (49, 49)
    assert await outbox.pending_count(env.redis, env.keys) == 0
    assert persister.handled == 49


# -- through the real server -----------------------------------------------------------------


async def _balance(redis_url: str, keys: Keys, uid: int) -> dict[str, int]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        raw: Any = await client.hgetall(keys.balances(uid))
    finally:
        await client.aclose()
    return {k.decode(): int(v) for k, v in raw.items()}


@pytest_asyncio.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(settings.database_url)
    yield conn
    await conn.close()


async def test_socket_bet_lands_in_bets_once(
    api: Api, settings: Settings, db: asyncpg.Connection
) -> None:
    uid, token = await api.player(deposit="10.00")
    async with api.play(token) as p:
        reply = await p.bet(amount="1.25", target="50.00", direction="over")
    assert reply["type"] == "bet_result", reply

    row: Any = await eventually(lambda: db.fetchrow(
        "SELECT * FROM bets WHERE bet_id = $1", reply["bet_id"]))
    assert row["user_id"] == uid
    assert row["currency"] == "USDT"
    assert row["amount"] == 125
    assert row["payout"] == minor(reply["payout"])
    assert row["roll"] == minor(reply["roll"])  # hundredths, same arithmetic
    assert row["target"] == 5000
    assert row["direction"] == "over"
    assert row["nonce"] == reply["nonce"]
    assert row["multiplier"] == round(float(reply["multiplier"]) * 10_000)
    assert row["server_seed_hash"] == reply["server_seed_hash"]
    assert row["client_seed"] == reply["client_seed"]
    assert row["balance_after"] == minor(reply["balance"])
    assert abs(row["created_at"].timestamp() - time.time()) < 60
    assert str(row["pair_id"]) == reply["bet_id"].split("-")[0]
    assert await db.fetchval(
        "SELECT count(*) FROM bets WHERE bet_id = $1", reply["bet_id"]) == 1
    ledger: Any = await db.fetchrow(
        "SELECT * FROM ledger WHERE entry_id = $1", f"bet:{reply['bet_id']}")
    assert ledger is not None
    assert (ledger["user_id"], ledger["currency"], ledger["delta"], ledger["kind"]) == (
        uid, "USDT", row["payout"] - 125, "bet")
    deposit_rows = await db.fetch(
        "SELECT delta FROM ledger WHERE user_id = $1 AND kind = 'deposit'", uid)
    assert [r["delta"] for r in deposit_rows] == [1000]


async def test_socket_rotate_reveals_the_old_pair(
    api: Api, settings: Settings, db: asyncpg.Connection
) -> None:
    _, token = await api.player(deposit="10.00")
    async with api.play(token) as p:
        first = await p.bet(amount="1.00")
        second = await p.bet(amount="1.00")
        rotated = await p.request({"type": "rotate_seed", "id": 99, "client_seed": "next-1"})
    assert rotated["type"] == "seed_rotated", rotated
    pid = int(first["bet_id"].split("-")[0])
    assert second["nonce"] == 2

    async def revealed() -> Any:
        row = await db.fetchrow(
            "SELECT revealed_at, final_nonce FROM seed_pairs WHERE pair_id = $1", pid)
        return row if row is not None and row["revealed_at"] is not None else None

    row: Any = await eventually(revealed)
    client = aioredis.Redis.from_url(settings.redis_url)
    try:  # the reveal event itself went through the outbox too
        assert await eventually(lambda: _drained(client, Keys(settings.key_prefix,
                                                              settings.buckets)))
    finally:
        await client.aclose()
    assert row["final_nonce"] == 2 == rotated["revealed"]["nonce"]
    # The two bets of the pair are persisted too, once each.
    assert await eventually(lambda: db.fetchval(
        "SELECT count(*) FROM bets WHERE pair_id = $1", pid)) == 2


async def test_ledger_rebuilds_every_redis_balance(
    api: Api, settings: Settings, db: asyncpg.Connection
) -> None:
    keys = Keys(settings.key_prefix, settings.buckets)
    players = [await api.player(deposit="10.00") for _ in range(3)]
    for uid, token in players:
        await api.deposit(uid, "2.50")
        async with api.play(token) as p:
            for i in range(6):
                reply = await p.bet(amount="0.75", target="49.50",
                                    direction="under" if i % 2 else "over")
                assert reply["type"] == "bet_result", reply

    for uid, _ in players:
        redis_balance = await _balance(settings.redis_url, keys, uid)
        assert set(redis_balance) == {"USDT"}

        async def ledger_agrees(uid: int = uid, expected: dict[str, int] = redis_balance) -> bool:
            rows = await db.fetch(
                "SELECT currency, sum(delta)::bigint AS total FROM ledger"
                " WHERE user_id = $1 GROUP BY currency", uid)
            return {r["currency"]: r["total"] for r in rows} == expected

        await eventually(ledger_agrees)
        assert await db.fetchval(
            "SELECT count(*) FROM bets WHERE user_id = $1", uid) == 6
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        assert await eventually(lambda: _drained(client, keys))
    finally:
        await client.aclose()


async def _drained(client: aioredis.Redis, keys: Keys) -> bool:
    return await outbox.pending_count(client, keys) == 0
