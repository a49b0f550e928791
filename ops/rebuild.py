"""Rebuild the Redis balances from the PostgreSQL ledger, after Redis lost data.

``python -m ops.rebuild`` (``make rebuild-balances``) sets every user's balance hash
``keys.balances(user)`` to ``SUM(delta)`` of the ledger per currency, overwriting what is
there (DEL + HSET in one MULTI, so a currency the ledger does not know disappears).

``REDIS_URL`` may name one Redis or any node of a Redis Cluster. On one Redis a chunk of
users is one MULTI; a cluster refuses a transaction over keys of two slots (CROSSSLOT), so
there each bucket's users of the chunk (whose keys share the bucket's slot) are one MULTI.
Every user is marked healed under the run id of the master holding its keys.

Run it with the servers and workers **stopped**: a bet settled while it runs would be
overwritten by a ledger sum that does not contain it yet, and that money would be lost.

It refuses (exit 1) while the outbox streams hold events: those moved money in Redis that
the ledger does not have yet, and a rebuild would erase them. Let the persister drain them
first (start the workers alone, or run the server without players), or pass ``--force`` when
the events are known to be lost anyway. A commission flush PostgreSQL paid and Redis has not
credited yet is in the rebuilt balances already (they come from the ledger): the rebuild
sets its credit markers (``Keys.credit_marker``), so the flush does not add it again.
Commissions of bets no flush has paid yet are in neither the ledger nor any balance, and
are paid later as usual.

It also puts back the deposit idempotency records (``keys.deposit_idem``) of every deposit
the ledger holds, where Redis lost them: otherwise an admin retrying an old idempotency key
would be credited again in Redis while the ledger, keyed by the same idempotency key, would
ignore it. A restored record answers a replay with the rebuilt balance (the balance right
after the original deposit is not known any more).

What the rebuild does NOT restore: seed pairs (a user without one gets a fresh pair on the
next sign-in, which is the safe outcome: no nonce can be reused; the lost pair stays
unrevealed in ``seed_pairs``), bet idempotency records (they expire within minutes anyway),
and the outbox streams themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from plumbing import heal
from plumbing.keys import CREDIT_MARKER_TTL_S, Keys, bucket_of
from plumbing.redisclient import Client, is_cluster, open_client
from plumbing.settings import Settings
from workers import outbox

CHUNK = 1000


class Refused(RuntimeError):
    """The rebuild would lose money: unpersisted events or an unfinished commission batch."""


@dataclass(slots=True)
class Rebuilt:
    balances: dict[int, dict[str, int]] = field(default_factory=dict)
    deposit_keys: int = 0


async def unfinished_work(redis: Client, keys: Keys) -> list[str]:
    """Why a rebuild now would lose or double money (empty when it is safe)."""
    reasons: list[str] = []
    pending = await outbox.pending_count(redis, keys)
    if pending:
        reasons.append(f"{pending} outbox event(s) are not persisted yet")
    return reasons


async def _apply(redis: Client, keys: Keys, batch: dict[int, dict[str, int]]) -> None:
    """Set each user's balances to the ledger's, and mark the user healed under the running
    Redis (plumbing/heal.py): its state now equals the ledger, which is what a heal makes.
    One transaction for the batch on one Redis; on a cluster one per bucket (one slot)."""
    rids = await heal.run_ids(redis, keys, batch)
    groups: dict[int, list[int]] = {}
    for user in batch:
        groups.setdefault(bucket_of(user, keys.buckets) if is_cluster(redis) else 0,
                          []).append(user)

    async def one(users: list[int]) -> None:
        pipe = redis.pipeline(transaction=True)
        for user in users:
            key = keys.balances(user)
            pipe.delete(key)
            if batch[user]:
                pipe.hset(key, mapping={c: str(v) for c, v in batch[user].items()})
            pipe.set(keys.healed(user), rids[user])
        await pipe.execute()

    await asyncio.gather(*(one(users) for users in groups.values()))


async def rebuild(
    redis: Client, pool: asyncpg.Pool, keys: Keys, users: Sequence[int] | None = None,
    force: bool = False, chunk: int = CHUNK,
) -> Rebuilt:
    """Overwrite the balances of every user in the ledger (or of ``users``).

    Raises:
        Refused: unpersisted outbox events, without ``force``.
    """
    if not force:
        reasons = await unfinished_work(redis, keys)
        if reasons:
            raise Refused("; ".join(reasons))
    out = Rebuilt()
    where = " WHERE user_id = ANY($1::bigint[])" if users is not None else ""
    args = (list(users),) if users is not None else ()
    async with pool.acquire() as conn, conn.transaction(
        isolation="repeatable_read", readonly=True
    ):
        batch: dict[int, dict[str, int]] = {}
        if users is not None:  # a listed user without ledger rows ends with no balance
            batch = {u: {} for u in users}
        async for r in conn.cursor(
            f"SELECT user_id, currency, SUM(delta) AS total FROM ledger{where}"
            " GROUP BY user_id, currency ORDER BY user_id", *args, prefetch=chunk,
        ):
            user = int(r["user_id"])
            if user not in batch and len(batch) >= chunk:
                await _apply(redis, keys, batch)
                out.balances.update(batch)
                batch = {}
            batch.setdefault(user, {})[r["currency"]] = int(r["total"])
        if batch:
            await _apply(redis, keys, batch)
            out.balances.update(batch)

        # Credits the ledger holds and Redis has not taken yet: now in the balances.
        pipe = redis.pipeline(transaction=False)
        for r in await conn.fetch("SELECT flush_id, user_ids FROM commission_flushes"
                                  " WHERE credited_at IS NULL"):
            for user in set(r["user_ids"]):
                if users is None or user in users:
                    pipe.set(keys.credit_marker(r["flush_id"], user), "1",
                             ex=CREDIT_MARKER_TTL_S)
        await pipe.execute()

        # Deposit idempotency records that Redis lost (HSETNX: never overwrite a live one).
        pipe = redis.pipeline(transaction=False)
        queued = 0
        async for r in conn.cursor(
            "SELECT d.idempotency_key, d.user_id, d.currency, d.amount FROM deposits d"
            " JOIN ledger l ON l.entry_id = 'dep:' || d.idempotency_key"
            + where.replace("user_id", "d.user_id"), *args, prefetch=chunk,
        ):
            user = int(r["user_id"])
            key = keys.deposit_idem(user, r["idempotency_key"])
            balance = out.balances.get(user, {}).get(r["currency"], 0)
            pipe.hsetnx(key, "f", f"{user}|{r['currency']}|{r['amount']}")
            pipe.hsetnx(key, "b", str(balance))
            queued += 1
            if queued % chunk == 0:
                out.deposit_keys += sum(await pipe.execute()) // 2
        if queued % chunk:
            out.deposit_keys += sum(await pipe.execute()) // 2
    return out


async def run(settings: Settings, users: Sequence[int] | None = None,
              force: bool = False) -> Rebuilt:
    keys = Keys(settings.key_prefix, settings.buckets)
    redis = await open_client(settings.redis_url)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        return await rebuild(redis, pool, keys, users, force)
    finally:
        await pool.close()
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.rebuild",
        description="Restore every Redis balance from the PostgreSQL ledger. Run it with the "
                    "servers and workers stopped.",
    )
    parser.add_argument("--force", action="store_true",
                        help="run even though outbox events or commission batches are "
                             "unfinished (they are then lost or may be paid twice)")
    parser.add_argument("--users", default=None,
                        help="only these user ids (comma-separated)")
    args = parser.parse_args(argv)
    users = None if args.users is None else [
        int(u) for u in args.users.replace(",", " ").split()
    ]
    settings = Settings()
    try:
        done = asyncio.run(run(settings, users, args.force))
    except Refused as exc:
        print(f"rebuild refused: {exc}. Let the workers persist them first (or --force).",
              file=sys.stderr)
        return 1
    for user, money in sorted(done.balances.items()):
        shown = " ".join(f"{c}={v}" for c, v in sorted(money.items())) or "(no ledger rows)"
        print(f"user {user}: {shown}")
    print(f"rebuilt {len(done.balances)} balance hash(es) from the ledger; "
          f"restored {done.deposit_keys} deposit idempotency record(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
