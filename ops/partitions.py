"""``python -m ops.partitions``: the monthly partitions of ``bets`` (docs/partitions.md).

- ``ensure [--ahead N]`` creates this month's partition and the next N months' (default 3)
  that are missing; rows that reached ``bets_default`` meanwhile move into their month.
  ``server.db.migrate`` runs it too, so every start of the launcher does; run it from
  cron (monthly is enough) on a system that runs for months without a restart. Nothing
  is lost without it: a bet with no month partition lands in ``bets_default``.
- ``detach --before YYYY-MM`` detaches every month partition that ends on or before the
  first of that month (UTC), after keeping what the audit needs of it (``bets_archived``,
  ``bets_archived_pairs``, ``bets_detached``). Refused for the current month or later, and
  while an outbox stream still holds an event from before the cutoff (its bet could not
  reach its month any more). The detached tables stay as plain tables: dump and drop them.
- ``list`` prints each partition, its range and its rows, and the detached months.

Reads ``REDIS_URL``, ``DATABASE_URL``, ``KEY_PREFIX`` and ``BUCKETS`` through
:class:`plumbing.settings.Settings`. Exit status 0 on success, 1 when refused, 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from plumbing.keys import Keys
from plumbing.redisclient import Client, open_client
from plumbing.settings import Settings

#: How many months ahead ``ensure`` creates by default (the launcher's too).
AHEAD = 3


class Refused(Exception):
    """The operation would be unsafe now; the message says why."""


async def ensure(pool: asyncpg.Pool, ahead: int = AHEAD) -> list[str]:
    """Create the missing partitions of this month and the next ``ahead``; their names."""
    rows = await pool.fetch("SELECT bets_ensure_partitions($1) AS name", ahead)
    return [r["name"] for r in rows]


def month_start(text: str) -> datetime:
    """``YYYY-MM`` (or ``YYYY-MM-01``) -> the first of that month, 00:00 UTC."""
    try:
        parsed = datetime.strptime(text[:7], "%Y-%m")
    except ValueError:
        raise ValueError(f"expected a month as YYYY-MM, got {text!r}") from None
    if text[7:] not in ("", "-01"):
        raise ValueError(f"expected a month as YYYY-MM, got {text!r}")
    return parsed.replace(tzinfo=UTC)


async def oldest_outbox_ms(redis: Client, keys: Keys) -> int | None:
    """The time (ms) of the oldest entry in any outbox stream (its id's first part)."""
    oldest: int | None = None
    for stream in keys.all_outboxes():
        first: Any = await redis.xrange(stream, count=1)
        if first:
            ms = int(bytes(first[0][0]).split(b"-")[0])
            oldest = ms if oldest is None else min(oldest, ms)
    return oldest


async def detach(pool: asyncpg.Pool, redis: Client, keys: Keys,
                 before: datetime) -> list[str]:
    """Detach the month partitions ending on or before ``before``; their names."""
    oldest = await oldest_outbox_ms(redis, keys)
    if oldest is not None and oldest < before.timestamp() * 1000:
        raise Refused(
            f"an outbox stream still holds an event from "
            f"{datetime.fromtimestamp(oldest / 1000, UTC):%Y-%m-%d %H:%M:%S} UTC, before the "
            f"cutoff: let the workers persist it first")
    try:
        rows = await pool.fetch("SELECT bets_detach_before($1) AS name", before)
    except asyncpg.RaiseError as exc:
        raise Refused(str(exc)) from None
    return [r["name"] for r in rows]


async def listing(pool: asyncpg.Pool) -> str:
    lines = ["partition          from                       to                         rows"]
    for r in await pool.fetch(
        "SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound,"
        " c.reltuples::bigint AS rows"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'bets'::regclass ORDER BY c.relname"
    ):
        lines.append(f"{r['name']:<18} {r['bound']}  ~{max(r['rows'], 0)}")
    for r in await pool.fetch("SELECT partition, range_from, range_to, bets, detached_at"
                              " FROM bets_detached ORDER BY range_from"):
        lines.append(f"{r['partition']:<18} detached {r['detached_at']:%Y-%m-%d}: "
                     f"{r['range_from']:%Y-%m} ({r['bets']} bets)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ops.partitions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ensure_cmd = sub.add_parser("ensure", help="create the coming months' partitions")
    ensure_cmd.add_argument("--ahead", type=int, default=AHEAD, choices=range(0, 121),
                            metavar="N", help=f"months after this one (default {AHEAD})")
    detach_cmd = sub.add_parser("detach", help="detach the months before a month")
    detach_cmd.add_argument("--before", required=True, metavar="YYYY-MM")
    sub.add_parser("list", help="the partitions and the detached months")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace, settings: Settings) -> int:
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    redis = await open_client(settings.redis_url)
    try:
        if args.command == "ensure":
            made = await ensure(pool, args.ahead)
            print(f"created: {', '.join(made)}" if made else "nothing to create")
        elif args.command == "detach":
            keys = Keys(settings.key_prefix, settings.buckets)
            gone = await detach(pool, redis, keys, month_start(args.before))
            print(f"detached: {', '.join(gone)}" if gone else "nothing to detach")
        else:
            print(await listing(pool))
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
        await pool.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "detach":
        try:
            month_start(args.before)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return asyncio.run(_main(args, Settings()))


if __name__ == "__main__":
    sys.exit(main())
