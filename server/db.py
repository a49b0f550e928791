"""PostgreSQL: create the database when missing, apply numbered migrations under a lock."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
#: pg_advisory_lock key shared by every process that migrates (any constant will do).
MIGRATION_LOCK = 0x5354414B
#: Months after the current one whose bets partitions every migrate() makes sure exist.
PARTITIONS_AHEAD = 3


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def database_name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/") or "postgres"


async def ensure_database(dsn: str) -> None:
    """Create the database named in ``dsn`` if it does not exist."""
    name = database_name(dsn)
    conn = await asyncpg.connect(_with_database(dsn, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            except asyncpg.DuplicateDatabaseError:
                pass
    finally:
        await conn.close()


async def drop_database(dsn: str) -> None:
    conn = await asyncpg.connect(_with_database(dsn, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database_name(dsn)}" WITH (FORCE)')
    finally:
        await conn.close()


async def migrate(dsn: str) -> list[str]:
    """Apply every migrations/NNN_*.sql not applied yet, each in its own transaction, then
    create the coming months' partitions of ``bets`` that are missing.

    Returns the names applied. Safe to run from several processes at once: the advisory lock
    serialises them and the second finds nothing left to do.
    """
    await ensure_database(dsn)
    conn = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for path in sorted(MIGRATIONS.glob("[0-9][0-9][0-9]_*.sql")):
            version = int(path.name[:3])
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    version,
                    path.name,
                )
            applied.append(path.name)
        # The coming months' partitions of bets (migrations/006; ops.partitions ensure):
        # every start keeps them ahead, and a bet with no month partition still lands in
        # bets_default, so nothing depends on this running on time.
        if await conn.fetchval("SELECT to_regproc('bets_ensure_partitions') IS NOT NULL"):
            await conn.execute("SELECT bets_ensure_partitions($1)", PARTITIONS_AHEAD)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        await conn.close()
    return applied
