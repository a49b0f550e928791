"""bets partitioned by month (migrations/006_bets_partitioned.sql, ops/partitions.py) on a
real PostgreSQL: the migration keeps the rows, a replayed outbox batch inserts nothing twice,
a bet lands in its month's partition (or the default one, moved out when its month is
created), and detaching old months leaves the audit passing over what remains."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops import audit, partitions
from plumbing.events import BetRow
from plumbing.keys import Keys
from server.db import MIGRATIONS, drop_database, ensure_database, migrate
from tests.conftest import (
    ADMIN_TOKEN,
    RedisServer,
    database_named,
    fresh_database_name,
    own_settings,
    serve,
)
from tests.helpers import Api, outbox_drained, play_alternating, tool
from workers import outbox

NOW = datetime.now(UTC)


def month_of(moment: datetime) -> str:
    return f"bets_p{moment:%Y_%m}"


def months_from_now(n: int) -> datetime:
    """Noon on the 15th, ``n`` months from this one (negative: before), UTC."""
    year, month = divmod(NOW.year * 12 + NOW.month - 1 + n, 12)
    return datetime(year, month + 1, 15, 12, tzinfo=UTC)


def bet(bet_id: str, at: datetime, user: int = 1, amount: int = 100) -> BetRow:
    return (bet_id, user, 1, "USDT", amount, 0, 1234, 5000, "over", 1, 19800, "h" * 64,
            "client", 900, int(at.timestamp() * 1000), None)  # no client bet id


async def migrate_until(dsn: str, version: int) -> None:
    """Apply the migrations before ``version`` the way server.db.migrate records them."""
    await ensure_database(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                           " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        for path in sorted(MIGRATIONS.glob("[0-9][0-9][0-9]_*.sql")):
            if int(path.name[:3]) < version:
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2)",
                                       int(path.name[:3]), path.name)
    finally:
        await conn.close()


async def where_is(conn: asyncpg.Connection | asyncpg.Pool, bet_id: str) -> list[str]:
    return [r["p"] for r in await conn.fetch(
        "SELECT tableoid::regclass::text AS p FROM bets WHERE bet_id = $1", bet_id)]


async def test_migration_keeps_every_row_and_partitions_by_month() -> None:
    dsn = database_named(fresh_database_name("part"))
    await migrate_until(dsn, 6)
    conn = await asyncpg.connect(dsn)
    try:
        old, far = months_from_now(-20), months_from_now(9)
        rows = [bet("1-1", old), bet("1-2", NOW), bet("1-3", far), bet("1-4", old, amount=7)]
        # As the persister before 006 wrote them (its ON CONFLICT target was bet_id alone).
        await conn.executemany(
            "INSERT INTO bets (bet_id, user_id, pair_id, currency, amount, payout, roll,"
            " target, direction, nonce, multiplier, server_seed_hash, client_seed,"
            " balance_after, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
            " $11, $12, $13, $14, to_timestamp($15 / 1000.0))", [r[:15] for r in rows])
        await conn.executemany(
            "INSERT INTO ledger (entry_id, user_id, currency, delta, kind, created_at)"
            " VALUES ('bet:' || $1, $2, $3, $4, 'bet', to_timestamp($5 / 1000.0))",
            [(r[0], r[1], r[3], r[5] - r[4], r[14]) for r in rows])
        before = [dict(r) for r in await conn.fetch("SELECT * FROM bets ORDER BY bet_id")]
        ledger_before = await conn.fetch("SELECT * FROM ledger ORDER BY entry_id")
        old_indexes = {r["i"] for r in await conn.fetch(
            "SELECT indexrelid::regclass::text AS i FROM pg_index"
            " WHERE indrelid = 'bets'::regclass")}
        assert len(before) == 4

        assert "006_bets_partitioned.sql" in await migrate(dsn)

        after = [dict(r) for r in await conn.fetch("SELECT * FROM bets ORDER BY bet_id")]
        assert after == before
        assert await conn.fetch("SELECT * FROM ledger ORDER BY entry_id") == ledger_before
        assert await conn.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = 'bets'::regclass") == "p"
        assert await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'bets'::regclass AND contype = 'p'"
        ) == "PRIMARY KEY (bet_id, created_at)"
        new_indexes = {r["i"] for r in await conn.fetch(
            "SELECT indexrelid::regclass::text AS i FROM pg_index"
            " WHERE indrelid = 'bets'::regclass")}
        assert new_indexes == old_indexes  # bets_pkey, bets_user, bets_pair, ...
        assert await where_is(conn, "1-1") == [month_of(old)]
        assert await where_is(conn, "1-4") == [month_of(old)]
        assert await where_is(conn, "1-2") == [month_of(NOW)]
        assert await where_is(conn, "1-3") == [month_of(far)]
        # This month and the three after it exist, and the default partition.
        parts = {r["p"] for r in await conn.fetch(
            "SELECT inhrelid::regclass::text AS p FROM pg_inherits"
            " WHERE inhparent = 'bets'::regclass")}
        assert {month_of(months_from_now(i)) for i in range(4)} | {"bets_default"} <= parts
        # The CHECK constraints came along: a bad row is still refused.
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE bets SET amount = 0 WHERE bet_id = '1-2'")
    finally:
        await conn.close()
        await drop_database(dsn)


@pytest.fixture
def pool_dsn() -> Any:
    dsn = database_named(fresh_database_name("part"))
    asyncio.run(migrate(dsn))
    yield dsn
    asyncio.run(drop_database(dsn))


_MONTHS = st.sampled_from([-14, -1, 0, 1, 3, 30])  # 30: beyond the ensured ones (default)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(months=st.lists(_MONTHS, min_size=1, max_size=8),
       batches=st.lists(st.lists(st.integers(0, 7), max_size=10), min_size=1, max_size=5))
def test_replayed_outbox_batches_insert_each_bet_once(
    pool_dsn: str, months: list[int], batches: list[list[int]]
) -> None:
    """Any batches of the same events, in any order and repeated (a retried job, a
    reclaimed entry, two consumers), store each bet once and its ledger row once."""
    tag = uuid.uuid4().hex[:8]
    events = [bet(f"{tag}-{i}", months_from_now(m)) for i, m in enumerate(months)]

    async def run() -> None:
        pool = await asyncpg.create_pool(pool_dsn, min_size=1, max_size=2)
        try:
            written: set[str] = set()
            for batch in [*batches, list(range(len(events)))]:
                chosen = [events[i % len(events)] for i in batch]
                await outbox.write(pool, chosen)
                await outbox.write(pool, chosen)  # the replay
                written |= {e[0] for e in chosen}
            counts = {r["bet_id"]: r["n"] for r in await pool.fetch(
                "SELECT bet_id, count(*) AS n FROM bets WHERE bet_id LIKE $1 GROUP BY 1",
                f"{tag}-%")}
            assert counts == dict.fromkeys(written, 1)
            ledger = await pool.fetchval(
                "SELECT count(*) FROM ledger WHERE entry_id LIKE $1", f"bet:{tag}-%")
            assert ledger == len(written)
        finally:
            await pool.close()

    asyncio.run(run())


async def test_a_bet_lands_in_its_month_or_the_default_until_its_month_exists(
    own_database: str,
) -> None:
    pool = await asyncpg.create_pool(own_database, min_size=1, max_size=2)
    try:
        soon, later = months_from_now(2), months_from_now(8)
        await outbox.write(pool, [bet("9-1", soon), bet("9-2", later)])
        assert await where_is(pool, "9-1") == [month_of(soon)]
        assert await where_is(pool, "9-2") == ["bets_default"]
        # Creating the months ahead moves the waiting row into its month, and only it.
        made = await partitions.ensure(pool, 8)
        assert month_of(later) in made and month_of(soon) not in made
        assert await where_is(pool, "9-2") == [month_of(later)]
        assert await pool.fetchval("SELECT count(*) FROM bets_default") == 0
        assert await partitions.ensure(pool, 8) == []
        # A replay of the moved bet still meets it.
        await outbox.write(pool, [bet("9-2", later)])
        assert await where_is(pool, "9-2") == [month_of(later)]
    finally:
        await pool.close()


async def test_detaching_old_months_leaves_the_audit_passing(
    redis_server: RedisServer, own_database: str
) -> None:
    s = own_settings(redis_server.url, own_database)
    keys = Keys(s.key_prefix, s.buckets)
    redis = aioredis.Redis.from_url(s.redis_url)
    pool = await asyncpg.create_pool(own_database, min_size=1, max_size=2)
    try:
        async with serve(s) as served, Api(served.address, ADMIN_TOKEN) as api:
            old_player, old_token = await api.player(deposit="100.00")
            _, new_token = await api.player(deposit="100.00")
            await play_alternating(api, old_token, 10)
            await play_alternating(api, new_token, 6)
            await outbox_drained(redis, keys)
        # The first player's bets become history of five months ago (a partition for that
        # month first, so they do not wait in the default one); their ledger rows keep the
        # bets' time, as the persister writes them.
        await pool.execute("SELECT bets_create_partition(now() - interval '5 months')")
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE bets SET created_at = created_at - interval '5 months'"
                               " WHERE user_id = $1", old_player)
            await conn.execute("UPDATE ledger SET created_at = created_at - interval"
                               " '5 months' WHERE user_id = $1 AND kind = 'bet'", old_player)
        first = await audit.run(s, retries=0)
        assert first.ok and first.bets.bets == 16, audit.summary(first)

        this_month = f"{NOW:%Y-%m}"
        cut = await asyncio.to_thread(tool, s, "ops.partitions", "detach", "--before",
                                      this_month)
        assert cut.returncode == 0, cut.stdout + cut.stderr
        assert month_of(months_from_now(-5)) in cut.stdout
        assert await pool.fetchval("SELECT count(*) FROM bets WHERE user_id = $1",
                                   old_player) == 0
        assert await pool.fetchval(
            "SELECT sum(bets) FROM bets_archived WHERE user_id = $1", old_player) == 10
        # The detached table is still there, for the operator to dump and drop.
        assert await pool.fetchval(f"SELECT count(*) FROM {month_of(months_from_now(-5))}"
                                   ) == 10

        after = await audit.run(s, retries=0)
        assert after.ok, audit.summary(after)
        assert after.bets.bets == 6  # the attached bets are still recomputed one by one
        # What was kept is what makes it pass: without it, money is unaccounted for.
        await pool.execute("DELETE FROM bets_archived")
        broken = await audit.run(s, retries=0)
        assert any(f.check == "conservation" for f in broken.failures), audit.summary(broken)

        # The current month is refused, and so is a bad month.
        refused = await asyncio.to_thread(tool, s, "ops.partitions", "detach", "--before",
                                          f"{months_from_now(1):%Y-%m}")
        assert refused.returncode == 1 and "refused" in refused.stderr, refused.stderr
        bad = await asyncio.to_thread(tool, s, "ops.partitions", "detach", "--before", "2026-13")
        assert bad.returncode == 2 and "YYYY-MM" in bad.stderr
        listed = await asyncio.to_thread(tool, s, "ops.partitions", "list")
        assert listed.returncode == 0 and "detached" in listed.stdout, listed.stderr
    finally:
        await pool.close()
        await redis.aclose()


async def test_detach_waits_for_older_outbox_events(
    redis_server: RedisServer, own_database: str
) -> None:
    keys = Keys(f"d{uuid.uuid4().hex[:6]}", 2)
    redis = aioredis.Redis.from_url(redis_server.url)
    pool = await asyncpg.create_pool(own_database, min_size=1, max_size=1)
    try:
        await pool.execute("SELECT bets_create_partition(now() - interval '3 months')")
        old = months_from_now(-3)
        await redis.xadd(keys.outbox(1), {"k": "x"}, id=f"{int(old.timestamp() * 1000)}-1")
        with pytest.raises(partitions.Refused, match="outbox"):
            await partitions.detach(pool, redis, keys, datetime(NOW.year, NOW.month, 1,
                                                                  tzinfo=UTC))
        assert month_of(old) in await where_parts(pool)  # nothing was detached
        await redis.delete(keys.outbox(1))
        gone = await partitions.detach(pool, redis, keys,
                                       datetime(NOW.year, NOW.month, 1, tzinfo=UTC))
        assert month_of(old) in gone and month_of(old) not in await where_parts(pool)
    finally:
        await pool.close()
        await redis.aclose()


async def where_parts(pool: asyncpg.Pool) -> set[str]:
    return {r["p"] for r in await pool.fetch(
        "SELECT inhrelid::regclass::text AS p FROM pg_inherits"
        " WHERE inhparent = 'bets'::regclass")}
