"""PostgreSQL's side of persistence: bets/s and rows/s it takes through the persister's own
statement (:func:`workers.outbox.write`: COPY into the staging table, then one INSERT of the
bets and their ledger rows), its CPU and WAL per 1,000 bets, and the disk a bet takes.

Creates a database of its own on the server of ``--database-url`` (dropped at the end),
migrates it (``--plain``: only the migrations before 006, i.e. ``bets`` unpartitioned,
with 006's primary key, for the comparison), and writes ``--bets`` synthetic bets in
batches of ``--batch`` from ``--writers`` concurrent connections (the persist shards of
several workers). PostgreSQL's CPU is read from ``/proc`` for the backends serving those
connections, so the server must be on this machine (loopback).

    python -m bench.pgwrite --bets 400000 --batch 500 --writers 2
    python -m bench.pgwrite --bets 400000 --batch 500 --writers 2 --plain
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from urllib.parse import urlsplit

import asyncpg

from plumbing.events import BetRow
from server.db import MIGRATIONS, drop_database, ensure_database, migrate
from workers import outbox

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def migrate_plain(dsn: str) -> None:
    await ensure_database(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        for path in sorted(MIGRATIONS.glob("[0-9][0-9][0-9]_*.sql")):
            if int(path.name[:3]) < 6:
                await conn.execute(path.read_text())
        # The persister's ON CONFLICT names (bet_id, created_at): the same key, unpartitioned.
        await conn.execute("ALTER TABLE bets DROP CONSTRAINT bets_pkey,"
                           " ADD PRIMARY KEY (bet_id, created_at)")
    finally:
        await conn.close()


def rows(prefix: str, start: int, count: int) -> list[BetRow]:
    ts = int(time.time() * 1000)
    return [(f"{prefix}{n}-1", n % 50_000, n, "USDT", 100, 198 if n % 2 else 0, 1234, 5000,
             "over", 1, 19800, "h" * 64, "client", 1000, ts, None)
            for n in range(start, start + count)]


async def run(args: argparse.Namespace) -> dict[str, float | int | str]:
    base = urlsplit(args.database_url)
    dsn = base._replace(path=f"/stakepro_pgwrite_{uuid.uuid4().hex[:6]}").geturl()
    await (migrate_plain(dsn) if args.plain else migrate(dsn))
    pool = await asyncpg.create_pool(dsn, min_size=args.writers, max_size=args.writers)
    try:
        pids = [int(r["pid"]) for r in await pool.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]
        batches = [rows("b", n, min(args.batch, args.bets - n))
                   for n in range(0, args.bets, args.batch)]
        lsn0 = await pool.fetchval("SELECT pg_current_wal_lsn()")
        cpu0 = sum(cpu_s(p) for p in pids)
        started = time.monotonic()
        queue = iter(batches)

        async def writer() -> None:
            for batch in queue:
                await outbox.write(pool, batch)

        await asyncio.gather(*(writer() for _ in range(args.writers)))
        wall = time.monotonic() - started
        cpu = sum(cpu_s(p) for p in pids) - cpu0
        wal = await pool.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", lsn0)
        stored = await pool.fetchval("SELECT count(*) FROM bets")
        disk = await pool.fetchval(
            "SELECT COALESCE((SELECT sum(pg_total_relation_size(relid))"
            "                 FROM pg_partition_tree('bets')), pg_total_relation_size('bets'))"
            " + pg_total_relation_size('ledger')")
        assert stored == args.bets, (stored, args.bets)
    finally:
        await pool.close()
        await drop_database(dsn)
    return {
        "table": "plain" if args.plain else "partitioned", "bets": args.bets,
        "batch": args.batch, "writers": args.writers, "seconds": round(wall, 2),
        "bets_per_s": round(args.bets / wall), "rows_per_s": round(2 * args.bets / wall),
        "pg_cpu_ms_per_1000_bets": round(cpu * 1e6 / args.bets, 1),
        "pg_cores": round(cpu / wall, 2),
        "wal_bytes_per_bet": round(float(wal) / args.bets),
        "disk_bytes_per_bet": round(float(disk) / args.bets),  # bets + ledger, with indexes
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pgwrite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get(
        "DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres"))
    parser.add_argument("--bets", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--plain", action="store_true",
                        help="bets unpartitioned (the migrations before 006)")
    args = parser.parse_args()
    host = urlsplit(args.database_url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the database must be on loopback (its CPU is read from /proc)")
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
